"""RKD distance and angle losses: hand values, gradients, invariances and numerics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from kd_lightning import KDConfigError
from kd_lightning.losses import pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss


F64 = torch.float64


# ---- RKD: hand-computed values -------------------------------------------------------------
def _huber(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def _dist(a, b) -> float:
    return math.hypot(*(u - v for u, v in zip(a, b)))


def _hand_distance_loss(s, t) -> float:
    n = len(s)

    def psi(e):
        d = [[_dist(e[i], e[j]) for j in range(n)] for i in range(n)]
        nonzero = [v for row in d for v in row if v > 0]
        mu = sum(nonzero) / len(nonzero)
        return [[v / mu for v in row] for row in d]

    ps, pt = psi(s), psi(t)
    return sum(_huber(ps[i][j] - pt[i][j]) for i in range(n) for j in range(n)) / n**2


def _hand_angle_loss(s, t) -> float:
    n = len(s)

    def cos(e, i, j, k):  # angle at vertex j between e_i and e_k
        u = [a - b for a, b in zip(e[i], e[j])]
        v = [a - b for a, b in zip(e[k], e[j])]
        nu, nv = math.hypot(*u), math.hypot(*v)
        if nu == 0 or nv == 0:
            return 0.0
        return sum(a * b for a, b in zip(u, v)) / (nu * nv)

    return sum(_huber(cos(s, i, j, k) - cos(t, i, j, k))
               for i, j, k in itertools.product(range(n), repeat=3)) / n**3


S3 = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]  # a 3-4-5 right triangle
T3 = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]  # a right isosceles triangle


def test_rkd_distance_matches_hand_computed_value():
    # student distances 3, 4, 5 (mean 4) -> 0.75, 1, 1.25; teacher 1, 1, sqrt2 over (2 + sqrt2)/3
    mu_t = (2 + math.sqrt(2)) / 3
    by_hand = 2 * (_huber(0.75 - 1 / mu_t) + _huber(1.25 - 1 / mu_t) + _huber(1 - math.sqrt(2) / mu_t)) / 9
    assert by_hand == pytest.approx(_hand_distance_loss(S3, T3), rel=1e-12)
    assert by_hand == pytest.approx(0.0237013, abs=1e-7)
    got = rkd_distance_loss(torch.tensor(S3), torch.tensor(T3))
    assert got.item() == pytest.approx(by_hand, rel=1e-5)


def test_rkd_angle_matches_hand_computed_value():
    got = rkd_angle_loss(torch.tensor(S3), torch.tensor(T3))
    assert got.item() == pytest.approx(_hand_angle_loss(S3, T3), rel=1e-5)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g)  # widths may differ
    assert rkd_angle_loss(s, t).item() == pytest.approx(_hand_angle_loss(s.tolist(), t.tolist()), rel=1e-5)
    assert rkd_distance_loss(s, t).item() == pytest.approx(_hand_distance_loss(s.tolist(), t.tolist()),
                                                           rel=1e-5)


def test_rkd_total_weights_and_invariances():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 8, generator=g)
    total, d, a = rkd_loss(s, t)  # defaults w_d = 25, w_a = 50
    assert total.item() == pytest.approx(25 * d.item() + 50 * a.item(), rel=1e-6)
    assert d.item() > 0 and a.item() > 0
    # relations are invariant to scale, rotation and translation of an embedding
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    moved = 3.7 * t @ q + 5.0
    for term in rkd_loss(moved, t):
        assert term.item() == pytest.approx(0.0, abs=1e-5)
    _, d0, a0 = rkd_loss(s, t, w_d=0.0, w_a=50.0)
    assert d0.item() == 0.0 and a0.item() == pytest.approx(a.item())


@pytest.mark.parametrize("loss", [rkd_distance_loss, rkd_angle_loss, lambda s, t: rkd_loss(s, t)[0]],
                         ids=["distance", "angle", "total"])
def test_rkd_gradient_matches_finite_differences(loss):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 3, dtype=F64, generator=g, requires_grad=True)
    t = torch.randn(6, 5, dtype=F64, generator=g, requires_grad=True)
    assert gradcheck(lambda s_: loss(s_, t), (s,), eps=1e-6, atol=1e-6)
    loss(s, t).backward()
    assert t.grad is None  # the teacher side gets no gradient


def test_rkd_bad_inputs_explain_the_fix():
    with pytest.raises(KDConfigError, match="at least 2 examples per batch.*pairs.*triplets"):
        rkd_loss(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(KDConfigError, match="student embedding has 5 rows and the teacher embedding 4"):
        rkd_loss(torch.randn(5, 4), torch.randn(4, 4))


def test_rkd_angles_from_the_gram_matrix_equal_the_normalised_difference_form():
    from kd_lightning.losses.relation import _angles, _distances

    torch.manual_seed(0)
    e = torch.randn(12, 7) * 3 + 5  # offset: the Gram identities cancel large terms
    e[5] = e[2]  # a duplicate example: zero differences give cosine 0
    diff = torch.nn.functional.normalize(e.double().unsqueeze(0) - e.double().unsqueeze(1), p=2, dim=2)
    explicit = torch.bmm(diff, diff.transpose(1, 2))
    angles = _angles(_distances(e))
    assert angles.dtype == torch.float64  # computed in float64 for float32 embeddings
    assert torch.allclose(angles, explicit, atol=1e-12)


def test_rkd_is_computed_in_float32_under_bf16_autocast():
    from kd_lightning.losses import pairwise_distances

    torch.manual_seed(0)
    s, t = torch.randn(16, 32) * 2 + 10, torch.randn(16, 20) + 3
    ref_total, ref_d, ref_a = rkd_loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, d, a = rkd_loss(s, t)
        dist = pairwise_distances(s)
    assert dist.dtype == torch.float32 and torch.allclose(dist, pairwise_distances(s), atol=1e-5)
    assert torch.allclose(d, ref_d, rtol=1e-5) and torch.allclose(a, ref_a, rtol=1e-5)


# ---- the reference: explicit difference vectors e_i - e_j, in float64 -----------------------
def _unit_differences(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v[j, i] = e_i - e_j`` normalised (0 where it is exactly 0) and its norm ``[N, N]``."""
    v = e.unsqueeze(0) - e.unsqueeze(1)
    zero = (v == 0).all(dim=-1)
    # the norm and its reciprocal where the difference is non-zero; constant 0 (no gradient) elsewhere
    norm = torch.where(zero, 0.0, torch.where(zero, 1.0, v.pow(2).sum(-1)).sqrt())
    unit = v / torch.where(zero, 1.0, norm).unsqueeze(-1) * (~zero).unsqueeze(-1)
    return unit, norm


def _psi_d(e):
    _, norm = _unit_differences(e)
    return norm / (norm.sum() / (norm > 0).sum())


def _psi_a(e):
    unit, _ = _unit_differences(e)
    return torch.bmm(unit, unit.transpose(1, 2))  # [j, i, k]: cosine of the angle at e_j


def _reference(student, teacher, term):
    s = student.to(F64)
    t = teacher.detach().to(F64)
    psi = {"distance": _psi_d, "angle": _psi_a}[term]
    return F.smooth_l1_loss(psi(s), psi(t), reduction="mean")


LOSSES = {"distance": rkd_distance_loss, "angle": rkd_angle_loss}


def _compare(student, teacher, term, rtol=1e-6):
    """Value and student gradient of the RKD term vs the float64 explicit-difference reference."""
    s = student.detach().clone().requires_grad_(True)
    got = LOSSES[term](s, teacher)
    (g,) = torch.autograd.grad(got, s)
    s_ref = student.detach().clone().requires_grad_(True)
    ref = _reference(s_ref, teacher, term)
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    assert got.dtype == student.dtype and g.dtype == student.dtype
    assert ref.item() > 0
    assert got.item() == pytest.approx(ref.item(), rel=rtol), term
    # gradient: every entry to rtol of the largest one
    err = (g.to(F64) - g_ref).abs().max().item()
    assert err <= rtol * g_ref.abs().max().item(), (term, err, g_ref.abs().max().item())


def _batch(n, d, seed, dtype=F64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _with_duplicate(e: torch.Tensor, norm: float, rows=(3, 7)) -> torch.Tensor:
    e = e.clone()
    v = e[rows[0]].clone()
    e[list(rows)] = v * (norm / v.norm())  # bitwise equal rows
    return e


# ---- duplicate rows (repeated examples, collapsed features) --------------------------------
@pytest.mark.parametrize("term", ["distance", "angle"])
@pytest.mark.parametrize("norm", [1.0, 1e2, 1e4])
def test_duplicate_rows_of_large_norm_match_the_explicit_formula(term, norm):
    s = _with_duplicate(_batch(10, 6, 0), norm)
    t = _with_duplicate(_batch(10, 9, 1), 3.0, rows=(2, 5))
    _compare(s, t, term)
    # the student's duplicate pair is at distance exactly 0, so it is not a pair of the mean mu
    d = pairwise_distances(s)
    assert d[3, 7].item() == 0.0 and d[7, 3].item() == 0.0
    assert (d > 0).sum().item() == 10 * 9 - 2


@pytest.mark.parametrize("term", ["distance", "angle"])
def test_duplicate_rows_on_both_sides_and_in_float32(term):
    s = _with_duplicate(_batch(12, 5, 2), 1e4, rows=(0, 4, 9))  # three equal rows
    t = _with_duplicate(_batch(12, 8, 3), 1e4, rows=(0, 4))
    _compare(s, t, term)
    _compare(s.float(), t.float(), term)


# ---- large common offsets ---------------------------------------------------------------------
@pytest.mark.parametrize("term", ["distance", "angle"])
@pytest.mark.parametrize("offset", [1e3, 1e6])
def test_large_offsets_match_the_explicit_formula(term, offset):
    s = _batch(10, 6, 4) + offset
    t = _batch(10, 9, 5) * 2.0 - offset
    _compare(s, t, term)
    # the offset plus a duplicate pair
    _compare(_with_duplicate(_batch(10, 6, 6), 10.0) + offset, t, term)


# ---- float32 embeddings --------------------------------------------------------------------
@pytest.mark.parametrize("term", ["distance", "angle"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_float32_embeddings_match_the_float64_explicit_formula(term, offset):
    s = (_batch(16, 20, 7) + offset).float()
    t = (_batch(16, 12, 8) * 0.5 + offset).float()
    _compare(s, t, term)


def test_pairwise_distances_float32_with_offset_are_exact_to_float32_rounding():
    e = (_batch(16, 20, 9) + 1e3).float()
    _, ref = _unit_differences(e.to(F64))
    d = pairwise_distances(e)
    assert d.dtype == torch.float32
    assert torch.allclose(d.to(F64), ref, rtol=1e-6, atol=0)
    assert torch.allclose(pairwise_distances(e, squared=True).to(F64), ref**2, rtol=1e-6, atol=0)


def test_rkd_loss_total_agrees_with_both_reference_terms():
    s = _with_duplicate(_batch(10, 6, 10) + 1e4, 1e2)
    t = _batch(10, 9, 11)
    total, d, a = rkd_loss(s, t, w_d=25.0, w_a=50.0)
    ref_d, ref_a = _reference(s, t, "distance"), _reference(s, t, "angle")
    assert d.item() == pytest.approx(ref_d.item(), rel=1e-6)
    assert a.item() == pytest.approx(ref_a.item(), rel=1e-6)
    assert total.item() == pytest.approx(25 * ref_d.item() + 50 * ref_a.item(), rel=1e-6)


def test_all_equal_rows_give_zero_loss_and_zero_gradient():
    s = torch.ones(5, 4, dtype=F64).mul(1e3).requires_grad_(True)  # fully collapsed features
    t = torch.ones(5, 3, dtype=F64)
    total, d, a = rkd_loss(s, t)
    total.backward()
    assert total.item() == 0.0 and d.item() == 0.0 and a.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_a_non_finite_embedding_gives_a_non_finite_loss():
    s = _batch(6, 4, 12)
    s[2, 1] = float("nan")
    for term in rkd_loss(s, _batch(6, 3, 13)):
        assert term.isnan()
    s[2, 1] = float("inf")
    assert not torch.isfinite(rkd_loss(s, _batch(6, 3, 13))[0])
