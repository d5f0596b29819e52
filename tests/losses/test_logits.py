"""Losses on logits: DKD, DIST and logit standardisation against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from kd_lightning import KDConfigError
from kd_lightning.losses import (dist_loss, dist_terms, dkd_loss, dkd_terms, dkd_warmup_weight, kd_loss,
                                 pearson_correlation, standardize_logits, standardized_kd_loss)


from tests.conftest import F64, t32, t64

RTOL = 1e-6


def softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


# ---- DKD (Zhao et al. 2022) -----------------------------------------------------------------
DKD_S = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 1.5, 0.3, -0.4]])
DKD_T = np.array([[3.0, 1.0, 0.0, -2.0], [-0.5, 2.5, 1.0, 0.0]])
DKD_Y = [0, 2]


def _hand_dkd(s, t, y, temp):
    tckd, nckd = [], []
    for zs, zt, c in zip(s, t, y):
        ps, pt = softmax_np(zs / temp), softmax_np(zt / temp)
        bs, bt = [ps[c], 1 - ps[c]], [pt[c], 1 - pt[c]]
        tckd.append(temp**2 * sum(bt[k] * math.log(bt[k] / bs[k]) for k in range(2)))
        others = [k for k in range(len(zs)) if k != c]
        qs = [ps[k] / (1 - ps[c]) for k in others]
        qt = [pt[k] / (1 - pt[c]) for k in others]
        nckd.append(temp**2 * sum(a * math.log(a / b) for a, b in zip(qt, qs)))
    return np.array(tckd), np.array(nckd)


def test_dkd_matches_hand_computed_terms():
    tc_h, nc_h = _hand_dkd(DKD_S, DKD_T, DKD_Y, 2.0)
    y = torch.tensor(DKD_Y)
    tc, nc = dkd_terms(t64(DKD_S), t64(DKD_T), y, temperature=2.0, reduction="none")
    np.testing.assert_allclose(tc.numpy(), tc_h, rtol=1e-12)
    np.testing.assert_allclose(nc.numpy(), nc_h, rtol=1e-12)
    # float32 (the training dtype): KL of nearby distributions loses relative precision, not
    # absolute precision
    tc32, nc32 = dkd_terms(t32(DKD_S), t32(DKD_T), y, temperature=2.0, reduction="none")
    np.testing.assert_allclose(tc32.numpy(), tc_h, atol=1e-6)
    np.testing.assert_allclose(nc32.numpy(), nc_h, atol=1e-6)
    total = dkd_loss(t32(DKD_S), t32(DKD_T), y, alpha=1.0, beta=8.0, temperature=2.0)
    # (so the float32 total, itself a KL, is compared at 1e-5 relative, ~100 eps32)
    assert total.item() == pytest.approx(tc_h.mean() + 8 * nc_h.mean(), rel=1e-5)


def test_kd_equals_tckd_plus_one_minus_teacher_target_prob_times_nckd():
    torch.manual_seed(3)
    s, t, y = torch.randn(6, 5, dtype=F64), torch.randn(6, 5, dtype=F64), torch.randint(0, 5, (6,))
    for temp in (1.0, 4.0):
        tc, nc = dkd_terms(s, t, y, temperature=temp, reduction="none")
        p_t = torch.softmax(t / temp, dim=1)[torch.arange(6), y]
        kd = kd_loss(s, t, temp, reduction="none")  # computed in float32
        torch.testing.assert_close(tc + (1 - p_t) * nc, kd.to(F64), rtol=1e-5, atol=1e-6)
    # DKD's beta replaces the factor (1 - p_t^T): with beta = 1 the non-target term is no longer
    # suppressed on confidently-classified examples, so DKD(1, 1) >= KD
    dkd_11 = dkd_loss(s, t, y, 1.0, 1.0, 4.0, reduction="none")
    assert (dkd_11 >= kd_loss(s, t, 4.0, reduction="none").to(F64) - 1e-6).all()


def test_dkd_gradients_match_the_hand_derivation_and_finite_differences():
    temp = 2.0
    s = t64(DKD_S).requires_grad_(True)
    t, y = t64(DKD_T), torch.tensor(DKD_Y)
    tc, nc = dkd_terms(s, t, y, temperature=temp)
    g_tc, = torch.autograd.grad(tc, s, retain_graph=True)
    g_nc, = torch.autograd.grad(nc, s)
    b = len(DKD_Y)
    for n, c in enumerate(DKD_Y):
        ps, pt = softmax_np(DKD_S[n] / temp), softmax_np(DKD_T[n] / temp)
        for k in range(4):
            if k == c:
                # TCKD: T (p_t^S - p_t^T) on the target logit; NCKD does not see it
                assert g_tc[n, k].item() == pytest.approx(temp * (ps[c] - pt[c]) / b, rel=1e-10)
                assert g_nc[n, k].item() == 0.0
            else:
                qs, qt = ps[k] / (1 - ps[c]), pt[k] / (1 - pt[c])
                assert g_tc[n, k].item() == pytest.approx(-temp * (ps[c] - pt[c]) * qs / b, rel=1e-10)
                assert g_nc[n, k].item() == pytest.approx(temp * (qs - qt) / b, rel=1e-10)
    assert gradcheck(lambda z: dkd_terms(z, t, y, temperature=temp)[0], (s,))
    assert gradcheck(lambda z: dkd_terms(z, t, y, temperature=temp)[1], (s,))


def test_dkd_stays_finite_for_confident_predictions_and_two_classes():
    s = t32([[60.0, 0.0, -5.0], [0.0, 80.0, 1.0]]).requires_grad_(True)
    t = t32([[90.0, -10.0, 0.0], [0.0, 120.0, -3.0]])
    y = torch.tensor([0, 1])
    tc, nc = dkd_terms(s, t, y, temperature=1.0)
    (tc + nc).backward()
    assert torch.isfinite(tc) and torch.isfinite(nc) and torch.isfinite(s.grad).all()
    # non-target distributions of student and teacher differ here, so NCKD is positive
    assert nc.item() > 0.1
    # with two classes there is a single non-target class: NCKD is exactly 0
    _, nc2 = dkd_terms(torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    assert nc2.item() == 0.0


def test_dkd_warmup_weight_follows_the_authors_schedule():
    assert dkd_warmup_weight(0) == pytest.approx(1 / 20)
    assert dkd_warmup_weight(9) == pytest.approx(10 / 20)
    assert dkd_warmup_weight(19) == 1.0
    assert dkd_warmup_weight(100) == 1.0
    assert dkd_warmup_weight(0.5, warmup_epochs=5) == pytest.approx(1.5 / 5)
    assert dkd_warmup_weight(0, warmup_epochs=0) == 1.0
    with pytest.raises(KDConfigError, match="warmup_epochs must be >= 0"):
        dkd_warmup_weight(0, warmup_epochs=-1)
    with pytest.raises(KDConfigError, match="epoch must be >= 0"):
        dkd_warmup_weight(-1)


def test_dkd_rejects_bad_hyperparameters_and_targets():
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 2])
    with pytest.raises(KDConfigError, match="temperature must be > 0"):
        dkd_loss(s, t, y, temperature=0.0)
    with pytest.raises(KDConfigError, match="beta must be >= 0"):
        dkd_loss(s, t, y, beta=-1.0)
    with pytest.raises(KDConfigError, match="alpha must be >= 0"):
        dkd_loss(s, t, y, alpha=-0.5)
    with pytest.raises(KDConfigError, match="at least 2 classes"):
        dkd_loss(torch.randn(2, 1), torch.randn(2, 1), torch.tensor([0, 0]))
    with pytest.raises(KDConfigError, match="class indices"):
        dkd_loss(s, t, torch.tensor([0.0, 2.0]))
    with pytest.raises(KDConfigError, match="same shape"):
        dkd_loss(s, torch.randn(2, 4), y)
    with pytest.raises(KDConfigError, match="reduction"):
        dkd_terms(s, t, y, reduction="sum")


# ---- DIST (Huang et al. 2022) ---------------------------------------------------------------
def _pearson_np(u, v, eps: float = 1e-8) -> float:
    # the authors' form: eps added to the product of the norms of the centred vectors
    u, v = np.asarray(u, float), np.asarray(v, float)
    du, dv = u - u.mean(), v - v.mean()
    return float((du * dv).sum() / (math.sqrt((du**2).sum() * (dv**2).sum()) + eps))


def _hand_dist(s, t, temp):
    ys = np.array([softmax_np(r / temp) for r in s])
    yt = np.array([softmax_np(r / temp) for r in t])
    b, k = ys.shape
    inter = sum(1 - _pearson_np(ys[i], yt[i]) for i in range(b)) / b
    intra = sum(1 - _pearson_np(ys[:, j], yt[:, j]) for j in range(k)) / k
    return temp**2 * inter, temp**2 * intra


DIST_S = np.array([[1.0, 0.0, -1.0, 2.0], [0.5, 1.5, 0.0, -0.5], [2.0, -1.0, 0.5, 0.0]])
DIST_T = np.array([[2.0, 0.5, -2.0, 3.0], [0.0, 3.0, 1.0, -1.0], [1.0, 0.0, 2.0, 0.5]])


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dist_matches_hand_computed_terms(temp):
    inter_h, intra_h = _hand_dist(DIST_S, DIST_T, temp)
    inter, intra = dist_terms(t64(DIST_S), t64(DIST_T), temperature=temp)
    assert inter.item() == pytest.approx(inter_h, rel=1e-12)
    assert intra.item() == pytest.approx(intra_h, rel=1e-12)
    total = dist_loss(t32(DIST_S), t32(DIST_T), beta=2.0, gamma=0.5, temperature=temp)
    assert total.item() == pytest.approx(2 * inter_h + 0.5 * intra_h, rel=RTOL)


def test_pearson_is_affine_invariant_and_dist_gradients_match_finite_differences():
    torch.manual_seed(4)
    a, b = torch.randn(3, 6, dtype=F64), torch.randn(3, 6, dtype=F64)
    torch.testing.assert_close(pearson_correlation(2.5 * a + 7.0, 0.1 * b - 3.0), pearson_correlation(a, b))
    assert pearson_correlation(a, a).sub(1).abs().max().item() < 1e-8
    s, t = t64(DIST_S).requires_grad_(True), t64(DIST_T)
    assert gradcheck(lambda z: dist_terms(z, t, temperature=2.0)[0], (s,))
    assert gradcheck(lambda z: dist_terms(z, t, temperature=2.0)[1], (s,))
    # a student equal to the teacher has zero loss and gradient, up to the eps in the Pearson
    # denominator
    tt = t.clone().requires_grad_(True)
    loss = dist_loss(tt, t)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and tt.grad.abs().max().item() < 1e-5


def test_dist_rejects_bad_hyperparameters():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(KDConfigError, match="temperature must be > 0"):
        dist_loss(s, t, temperature=-1.0)
    with pytest.raises(KDConfigError, match="beta must be >= 0"):
        dist_loss(s, t, beta=-1.0)
    with pytest.raises(KDConfigError, match="gamma must be >= 0"):
        dist_loss(s, t, gamma=-1.0)
    with pytest.raises(KDConfigError, match="same shape"):
        dist_loss(s, torch.randn(3, 5))


# ---- logit standardisation (Sun et al. 2024) ------------------------------------------------
def _zscore_np(z, ddof=0):
    z = np.asarray(z, float)
    mean = sum(z) / len(z)
    std = math.sqrt(sum((v - mean) ** 2 for v in z) / (len(z) - ddof))
    return (z - mean) / (std + 1e-7)


def _hand_ls_kd(s, t, temp, ddof=0):
    out = []
    for zs, zt in zip(s, t):
        ps, pt = softmax_np(_zscore_np(zs, ddof) / temp), softmax_np(_zscore_np(zt, ddof) / temp)
        out.append(temp**2 * sum(a * math.log(a / b) for a, b in zip(pt, ps)))
    return float(np.mean(out))


def test_standardize_logits_hand_values():
    z = t32([[1.0, 2.0, 3.0, 6.0], [0.0, -1.0, 4.0, 1.0]])
    got = standardize_logits(z)
    np.testing.assert_allclose(got.numpy(), np.array([_zscore_np(r) for r in z.numpy()]), rtol=RTOL)
    assert got.mean(1).abs().max().item() < 1e-6
    assert got.std(1, correction=0).sub(1).abs().max().item() < 1e-5
    got1 = standardize_logits(z, correction=1)
    np.testing.assert_allclose(got1.numpy(), np.array([_zscore_np(r, 1) for r in z.numpy()]), rtol=RTOL)
    assert standardize_logits(torch.full((2, 5), 3.0)).abs().max().item() == 0.0


def test_standardized_kd_matches_hand_value_and_is_invariant_to_affine_logit_maps():
    s = np.array([[1.0, 2.0, 0.5], [3.0, -1.0, 0.0], [0.2, 0.1, 0.4]])
    t = np.array([[4.0, 1.0, 0.0], [8.0, -2.0, 1.0], [1.0, 0.0, 2.5]])
    got = standardized_kd_loss(t32(s), t32(t), temperature=2.0)
    # float32 z-scores then a KL of nearby distributions: ~100 eps32 relative (1e-5)
    assert got.item() == pytest.approx(_hand_ls_kd(s, t, 2.0), rel=1e-5)
    got1 = standardized_kd_loss(t32(s), t32(t), temperature=3.0, correction=1)
    assert got1.item() == pytest.approx(_hand_ls_kd(s, t, 3.0, ddof=1), rel=1e-5)
    # the loss only sees each logit vector up to a positive scale and a shift (per example)
    a = t32([[3.7], [0.2], [11.0]])
    moved = standardized_kd_loss(a * t32(s) - 5.0, 0.5 * t32(t) + t32([[2.0], [-9.0], [0.3]]), 2.0)
    assert moved.item() == pytest.approx(got.item(), rel=1e-5)
    # so a student whose logits are an affine image of the teacher's has zero loss
    # (plain KD does not: it asks for the same scale)
    zt = t32(t)
    assert standardized_kd_loss(0.25 * zt + 1.0, zt).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(0.25 * zt + 1.0, zt, 2.0).item() > 0.1


def test_standardized_kd_rejects_bad_hyperparameters():
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(KDConfigError, match="base temperature must be > 0"):
        standardized_kd_loss(s, t, temperature=0.0)
    with pytest.raises(KDConfigError, match="correction must be 0"):
        standardized_kd_loss(s, t, correction=2)
    with pytest.raises(KDConfigError, match="eps must be > 0"):
        standardize_logits(s, eps=0.0)
