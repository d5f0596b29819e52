"""RKD (Park et al. 2019) against the explicit-difference formula, where the Gram-matrix form loses
precision: duplicate rows of large norm, large common offsets, float32 embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss

F64 = torch.float64


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
