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
        mu = math.fsum(v for row in d for v in row) / (n * (n - 1))  # all pairs i != j (eq. 4)
        return [[v / mu for v in row] for row in d]

    ps, pt = psi(s), psi(t)
    return math.fsum(_huber(ps[i][j] - pt[i][j]) for i in range(n) for j in range(n)) / n**2


def _hand_angle_loss(s, t) -> float:
    n = len(s)

    def cos(e, i, j, k):  # angle at vertex j between e_i and e_k
        u = [a - b for a, b in zip(e[i], e[j])]
        v = [a - b for a, b in zip(e[k], e[j])]
        nu, nv = math.hypot(*u), math.hypot(*v)
        if nu == 0 or nv == 0:
            return 0.0
        return sum(a * b for a, b in zip(u, v)) / (nu * nv)

    return math.fsum(_huber(cos(s, i, j, k) - cos(t, i, j, k))
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


def test_mu_counts_the_pair_of_a_duplicated_example():
    # Park et al., eq. 4: mu is the mean over all pairs i != j. Rows 2 and 3 are equal: their
    # distance 0 is one of the 12 ordered pairs. Distances 3, 4, 4, 5, 5, 0 -> mu = 42 / 12 = 3.5
    # (4.2 if the zero pair were left out of the mean).
    s = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [0.0, 4.0]]
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    d_s = [[0, 3, 4, 4], [3, 0, 5, 5], [4, 5, 0, 0], [4, 5, 0, 0]]
    rt2 = math.sqrt(2)
    d_t = [[0, 1, 1, rt2], [1, 0, rt2, 1], [1, rt2, 0, 1], [rt2, 1, 1, 0]]
    mu_t = (8 + 4 * rt2) / 12
    by_hand = sum(_huber(d_s[i][j] / 3.5 - d_t[i][j] / mu_t) for i in range(4) for j in range(4)) / 16
    assert by_hand == pytest.approx(_hand_distance_loss(s, t), rel=1e-12)
    got = rkd_distance_loss(torch.tensor(s), torch.tensor(t))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    wrong_mu = sum(_huber(d_s[i][j] / 4.2 - d_t[i][j] / mu_t) for i in range(4) for j in range(4)) / 16
    assert abs(got.item() - wrong_mu) > 1e-3


def test_blocks_of_vertices_give_the_same_angle_term(monkeypatch):
    import kd_lightning.losses.relation as relation

    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(13, 6, generator=g), torch.randn(13, 9, generator=g)
    s[5] = s[2]
    results = []
    for block in (1, 4, 13):
        monkeypatch.setattr(relation, "_block_size", lambda n, width, device, b=block: b)
        x = s.clone().requires_grad_(True)
        value = rkd_angle_loss(x, t)
        value.backward()
        results.append((value, x.grad))
    for value, grad in results[1:]:
        assert torch.allclose(value, results[0][0], rtol=1e-6)
        assert torch.allclose(grad, results[0][1], rtol=1e-5, atol=1e-9)


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


# ---- the reference: the paper's formula in float64 ----------------------------------------------
# Values: the plain loops above (_hand_distance_loss, _hand_angle_loss) on the float64 values of
# the embeddings. Gradients: the same formula vectorised over explicit difference vectors.
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
    n = len(e)
    return norm / (norm.sum() / (n * (n - 1)))  # mu over all pairs i != j


def _psi_a(e):
    unit, _ = _unit_differences(e)
    return torch.bmm(unit, unit.transpose(1, 2))  # [j, i, k]: cosine of the angle at e_j


def _reference(student, teacher, term):
    s = student.to(F64)
    t = teacher.detach().to(F64)
    psi = {"distance": _psi_d, "angle": _psi_a}[term]
    return F.smooth_l1_loss(psi(s), psi(t), reduction="mean")


LOSSES = {"distance": rkd_distance_loss, "angle": rkd_angle_loss}
LOOPS = {"distance": _hand_distance_loss, "angle": _hand_angle_loss}


def _compare(student, teacher, term, rtol=1e-4):
    """Value and student gradient of the RKD term against the float64 formula, to ``rtol``."""
    s = student.detach().clone().requires_grad_(True)
    got = LOSSES[term](s, teacher)
    (g,) = torch.autograd.grad(got, s)
    assert got.dtype == student.dtype and g.dtype == student.dtype
    assert torch.isfinite(g).all()
    loop = LOOPS[term](student.to(F64).tolist(), teacher.to(F64).tolist())
    assert loop > 0
    assert got.item() == pytest.approx(loop, rel=rtol), term
    s_ref = student.detach().to(F64).requires_grad_(True)
    ref = _reference(s_ref, teacher, term)
    assert ref.item() == pytest.approx(loop, rel=1e-10)  # the vectorised form is the loop
    (g_ref,) = torch.autograd.grad(ref, s_ref)
    # gradient: every entry to rtol of the largest one
    err = (g.to(F64) - g_ref).abs().max().item()
    assert err <= rtol * g_ref.abs().max().item(), (term, err, g_ref.abs().max().item())


def _batch(n, d, seed, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _with_duplicate(e: torch.Tensor, norm: float, rows=(3, 7)) -> torch.Tensor:
    e = e.clone()
    v = e[rows[0]].clone()
    e[list(rows)] = v * (norm / v.norm())  # bitwise equal rows
    return e


# ---- duplicate rows (repeated examples, collapsed features) --------------------------------
@pytest.mark.parametrize("term", ["distance", "angle"])
@pytest.mark.parametrize("norm", [1.0, 1e2, 1e4])
def test_duplicate_rows_of_large_norm_match_the_paper_formula(term, norm):
    # two equal rows of norm up to 1e4 among rows of norm ~2.5: distances of one batch from ~1
    # to ~2e4, so the angle at a small row between a near and a far row is ill-conditioned for
    # any form built from distances alone
    s = _with_duplicate(_batch(10, 6, 0), norm)
    t = _with_duplicate(_batch(10, 9, 1), 3.0, rows=(2, 5))
    _compare(s, t, term)
    d = pairwise_distances(s)
    assert d.dtype == torch.float32
    assert d[3, 7].item() == 0.0 and d[7, 3].item() == 0.0  # the duplicate pair, exactly
    assert (d > 0).sum().item() == 10 * 9 - 2


@pytest.mark.parametrize("term", ["distance", "angle"])
def test_duplicate_rows_on_both_sides(term):
    s = _with_duplicate(_batch(12, 5, 2), 1e4, rows=(0, 4, 9))  # three equal rows
    t = _with_duplicate(_batch(12, 8, 3), 1e4, rows=(0, 4))
    _compare(s, t, term)
    _compare(s.double(), t.double(), term, rtol=1e-9)  # float64 embeddings stay float64


@pytest.mark.parametrize("term", ["distance", "angle"])
def test_many_repeated_examples_as_in_a_few_data_batch(term):
    # 16 rows drawn from 5 distinct examples, as a batch of a tiny training set can repeat them
    base_s, base_t = _batch(5, 12, 14), _batch(5, 20, 15)
    pick = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 3, 3, 4, 1, 0, 2, 2])
    _compare(base_s[pick] * 50.0, base_t[pick], term)


# ---- large norms, large offsets --------------------------------------------------------------
@pytest.mark.parametrize("term", ["distance", "angle"])
def test_rows_of_very_different_norms_match_the_paper_formula(term):
    # every row at its own norm, log-uniform in [1, 1e4]
    e = _batch(14, 8, 16, dtype=F64)
    order = torch.randperm(14, generator=torch.Generator().manual_seed(0))
    norms = 10.0 ** torch.linspace(0, 4, 14, dtype=F64)[order]
    s = (e / e.norm(dim=1, keepdim=True) * norms.unsqueeze(1)).float()
    _compare(s, _batch(14, 10, 17), term)
    _compare(_batch(14, 10, 17), s, term)  # the same batch as the teacher


@pytest.mark.parametrize("term", ["distance", "angle"])
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_large_offsets_match_the_paper_formula(term, offset):
    s = _batch(10, 6, 4) + offset
    t = _batch(10, 9, 5) * 2.0 - offset
    _compare(s, t, term)
    # the offset plus a duplicate pair
    _compare(_with_duplicate(_batch(10, 6, 6), 10.0) + offset, t, term)


@pytest.mark.parametrize("term", ["distance", "angle"])
def test_a_batch_of_the_paper_size_matches_the_paper_formula(term):
    s = _with_duplicate(_batch(32, 20, 7), 1e3, rows=(1, 30)) + 1e3
    _compare(s, _batch(32, 12, 8) * 0.5, term)


def test_pairwise_distances_float32_with_offset_are_exact_to_float32_rounding():
    e = _batch(16, 20, 9) + 1e4
    _, ref = _unit_differences(e.to(F64))
    d = pairwise_distances(e)
    assert d.dtype == torch.float32
    assert torch.allclose(d.to(F64), ref, rtol=1e-5, atol=0)
    assert torch.allclose(pairwise_distances(e, squared=True).to(F64), ref**2, rtol=1e-5, atol=0)


def test_rkd_loss_total_agrees_with_both_reference_terms():
    s = _with_duplicate(_batch(10, 6, 10) + 1e4, 1e2)
    t = _batch(10, 9, 11)
    total, d, a = rkd_loss(s, t, w_d=25.0, w_a=50.0)
    ref_d = _hand_distance_loss(s.to(F64).tolist(), t.to(F64).tolist())
    ref_a = _hand_angle_loss(s.to(F64).tolist(), t.to(F64).tolist())
    assert d.item() == pytest.approx(ref_d, rel=1e-4)
    assert a.item() == pytest.approx(ref_a, rel=1e-4)
    assert total.item() == pytest.approx(25 * ref_d + 50 * ref_a, rel=1e-4)


# ---- degenerate batches and dtypes -----------------------------------------------------------
def test_duplicates_give_finite_gradients_that_match_finite_differences():
    # the equal rows sit at a zero distance (where sqrt has no derivative); the formula's
    # gradient there is that of a constant 0 distance and a zero unit vector
    s = _with_duplicate(_batch(7, 3, 18, dtype=F64), 2.0, rows=(1, 5)).requires_grad_(True)
    t = _with_duplicate(_batch(7, 4, 19, dtype=F64), 1.0, rows=(0, 5))
    for loss in (rkd_distance_loss, rkd_angle_loss):
        (g,) = torch.autograd.grad(loss(s, t), s)
        assert torch.isfinite(g).all() and g.abs().max() > 0
        ref = _reference(s, t, "distance" if loss is rkd_distance_loss else "angle")
        (g_ref,) = torch.autograd.grad(ref, s)
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12)


def test_all_equal_rows_give_zero_loss_and_zero_gradient():
    s = torch.ones(5, 4).mul(1e3).requires_grad_(True)  # fully collapsed features
    t = torch.ones(5, 3)
    total, d, a = rkd_loss(s, t)
    total.backward()
    assert total.item() == 0.0 and d.item() == 0.0 and a.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_no_float64_tensor_in_a_float32_step():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class NoFloat64(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_leaves(out):
                assert not (isinstance(x, torch.Tensor) and x.dtype == torch.float64), func
            return out

    s = _with_duplicate(_batch(9, 6, 20), 10.0).requires_grad_(True)
    t = _batch(9, 5, 21)
    with NoFloat64():
        total, _, _ = rkd_loss(s, t)
        total.backward()
    assert total.dtype == torch.float32 and torch.isfinite(s.grad).all()


def test_a_non_finite_embedding_gives_a_non_finite_loss():
    s = _batch(6, 4, 12)
    s[2, 1] = float("nan")
    for term in rkd_loss(s, _batch(6, 3, 13)):
        assert term.isnan()
    s[2, 1] = float("inf")
    assert not torch.isfinite(rkd_loss(s, _batch(6, 3, 13))[0])


# ---- embeddings wider than the batch: the angles in the span of the centred rows ----------------
def _projected(e: torch.Tensor) -> bool:
    from kd_lightning.losses.relation import _span_coordinates

    return _span_coordinates(e, with_basis=True)[1] is not None


@pytest.mark.parametrize("term", ["distance", "angle"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_wide_embeddings_with_duplicates_match_the_paper_formula(term, offset):
    # D = 48 and 40 > N = 12: both sides are taken in the coordinates of their span (12 wide);
    # three equal rows on the student side, two on the teacher side, a common offset
    s = _with_duplicate(_batch(12, 48, 22), 30.0, rows=(0, 4, 9)) + offset
    t = _with_duplicate(_batch(12, 40, 23), 3.0, rows=(2, 5))
    assert _projected(s) and _projected(t)
    _compare(s, t, term)
    d = pairwise_distances(s)
    assert d[0, 4].item() == 0.0 and d[4, 9].item() == 0.0


@pytest.mark.parametrize("term", ["distance", "angle"])
def test_a_wide_few_data_batch_matches_the_paper_formula(term):
    # 20 rows of 6 distinct examples, 320-wide as the MNIST-1D CNN's embedding
    base_s, base_t = _batch(6, 320, 24) * 4.0, _batch(6, 320, 25)
    pick = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 3, 3, 4, 1, 0, 2, 2, 5, 5, 1])
    assert _projected(base_s[pick])
    _compare(base_s[pick], base_t[pick], term)


@pytest.mark.parametrize("term", ["distance", "angle"])
def test_ill_conditioned_wide_batches_keep_their_rows(term):
    # rows of norms from 1 to 1e4, and a pair 1e-3 apart at norm 10: pairs far closer than their
    # distance from the centre, where coordinates in the span would lose accuracy
    e = _batch(14, 40, 26, dtype=F64)
    norms = 10.0 ** torch.linspace(0, 4, 14, dtype=F64)
    spread = (e / e.norm(dim=1, keepdim=True) * norms.unsqueeze(1)).float()
    near = _batch(14, 40, 27) * 10.0
    near[5] = near[3] + 1e-3
    for s in (spread, near):
        assert not _projected(s)
        _compare(s, _batch(14, 36, 28), term)
