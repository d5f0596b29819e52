"""SP, PKT, NST, CC, DKD, DIST and logit-standardised KD against independent hand computations.

Each reference below is written out explicitly (loops over examples / classes / channels, numpy
float64) from the formula in the paper, not from the implementation under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from kd_lightning import KDConfigError
from kd_lightning.losses import (
    cc_correlation_matrix,
    cc_loss,
    dist_loss,
    dist_terms,
    dkd_loss,
    dkd_terms,
    dkd_warmup_weight,
    kd_loss,
    nst_loss,
    nst_mmd2,
    pearson_correlation,
    pkt_loss,
    similarity_matrix,
    sp_loss,
    standardize_logits,
    standardized_kd_loss,
)

F64 = torch.float64
RTOL = 1e-6


def t32(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def softmax_np(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


# ---- SP (Tung & Mori 2019) ------------------------------------------------------------------
def _hand_sp_layer(fs: np.ndarray, ft: np.ndarray) -> float:
    b = fs.shape[0]

    def g(f):
        q = f.reshape(b, -1)
        gt = np.array([[float(np.dot(q[i], q[j])) for j in range(b)] for i in range(b)])
        return np.array([row / math.sqrt(sum(v * v for v in row)) for row in gt])

    gs, gtt = g(fs), g(ft)
    return sum((gtt[i, j] - gs[i, j]) ** 2 for i in range(b) for j in range(b)) / b**2


SP_S1 = np.array([[[[1.0, 0.0], [2.0, 1.0]]], [[[0.5, -1.0], [1.0, 3.0]]],
                  [[[-2.0, 1.0], [0.0, 1.0]]]])  # [3, 1, 2, 2] map
SP_T1 = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [3.0, -1.0, 2.0]])  # [3, 3] vectors
SP_S2 = np.array([[1.0, -1.0], [2.0, 0.5], [0.0, 1.0]])
SP_T2 = np.array([[0.3, 1.0, 2.0, -1.0], [1.0, 1.0, 0.0, 2.0], [-1.0, 0.5, 1.0, 1.0]])


def test_sp_matches_hand_computed_value_summed_over_layer_pairs():
    one = sp_loss(t32(SP_S1), t32(SP_T1))
    assert one.item() == pytest.approx(_hand_sp_layer(SP_S1, SP_T1), rel=RTOL)
    both = sp_loss([t32(SP_S1), t32(SP_S2)], [t32(SP_T1), t32(SP_T2)])
    expected = _hand_sp_layer(SP_S1, SP_T1) + _hand_sp_layer(SP_S2, SP_T2)
    assert both.item() == pytest.approx(expected, rel=RTOL)


def test_sp_invariances_the_paper_relies_on():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3, 4, 4), torch.randn(5, 7)
    base = sp_loss(s, t)
    # any permutation of the features within a layer leaves F F^T unchanged
    perm = torch.randperm(3 * 4 * 4)
    s_perm = s.flatten(1)[:, perm].reshape(5, 3, 4, 4)
    torch.testing.assert_close(sp_loss(s_perm, t), base)
    # rescaling a layer's activations is removed by the row normalisation
    torch.testing.assert_close(sp_loss(3.5 * s, 0.2 * t), base)
    # reordering the batch on both sides permutes rows and columns of both G's alike
    order = torch.randperm(5)
    torch.testing.assert_close(sp_loss(s[order], t[order]), base)
    # a student whose similarities equal the teacher's has zero loss, whatever its width
    q, _ = torch.linalg.qr(torch.randn(10, 7))  # orthonormal columns: (t q^T)(t q^T)^T = t t^T
    assert sp_loss(t @ q.t(), t).item() == pytest.approx(0.0, abs=1e-7)
    assert similarity_matrix(torch.zeros(2, 3)).abs().sum().item() == 0.0


def test_sp_rejects_mismatched_batches_and_pair_counts():
    with pytest.raises(KDConfigError, match="same examples"):
        sp_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(KDConfigError, match="2 student features but 1 teacher"):
        sp_loss([torch.randn(4, 3)] * 2, [torch.randn(4, 3)])
    with pytest.raises(KDConfigError, match="no feature pairs"):
        sp_loss([], [])


# ---- PKT (Passalis & Tefas 2018) ------------------------------------------------------------
def _hand_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    b = s.shape[0]

    def cond(x):
        xn = [row / (math.sqrt(sum(v * v for v in row)) + eps) for row in x]
        k = [[(float(np.dot(xn[i], xn[j])) + 1) / 2 for j in range(b)] for i in range(b)]
        return [[k[i][j] / sum(k[i]) for j in range(b)] for i in range(b)]

    q, p = cond(s), cond(t)
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps))
               for i in range(b) for j in range(b)) / b**2


def test_pkt_matches_hand_computed_value():
    s = np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0], [2.0, 2.0]])
    t = np.array([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0], [-1.0, -1.0, 0.5], [1.0, 3.0, 0.0]])
    assert pkt_loss(t32(s), t32(t)).item() == pytest.approx(_hand_pkt(s, t), rel=RTOL)
    assert pkt_loss(t64(s), t64(t)).item() == pytest.approx(_hand_pkt(s, t), rel=1e-12)


def test_pkt_is_zero_when_the_student_matches_the_teacher():
    torch.manual_seed(1)
    t = torch.randn(6, 5)
    assert pkt_loss(t.clone(), t).item() == 0.0
    # cosine similarities ignore a positive rescaling of each example
    scale = torch.rand(6, 1) + 0.5
    assert pkt_loss(t * scale, t).item() == pytest.approx(0.0, abs=1e-7)
    assert pkt_loss(torch.randn(6, 5), t).item() > 1e-3


def test_pkt_rejects_bad_inputs():
    with pytest.raises(KDConfigError, match="same examples"):
        pkt_loss(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(KDConfigError, match="eps must be > 0"):
        pkt_loss(torch.randn(3, 2), torch.randn(3, 2), eps=0.0)


# ---- NST (Huang & Wang 2017) ----------------------------------------------------------------
def _hand_mmd2(fs: np.ndarray, ft: np.ndarray, d: int = 2, c: float = 0.0) -> float:
    total = 0.0
    for n in range(fs.shape[0]):
        s = [row / np.linalg.norm(row) for row in fs[n].reshape(fs.shape[1], -1)]
        t = [row / np.linalg.norm(row) for row in ft[n].reshape(ft.shape[1], -1)]

        def k(x, y):
            return (float(np.dot(x, y)) + c) ** d

        tt = sum(k(a, b) for a in t for b in t) / len(t) ** 2
        ss = sum(k(a, b) for a in s for b in s) / len(s) ** 2
        st = sum(k(a, b) for a in s for b in t) / (len(s) * len(t))
        total += tt + ss - 2 * st
    return total / fs.shape[0]


NST_S = np.array([[[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]],
                  [[2.0, -1.0, 1.0], [1.0, 1.0, 1.0]]])  # [B=2, C_s=2, L=3]
NST_T = np.array([[[0.5, 1.0, 2.0], [1.0, 0.0, 0.0], [1.0, 2.0, 3.0]],
                  [[0.0, 1.0, -1.0], [2.0, 2.0, 1.0], [-1.0, 0.5, 1.0]]])  # [2, C_t=3, 3]


def test_nst_matches_hand_computed_mmd():
    assert nst_mmd2(t32(NST_S), t32(NST_T)).item() == pytest.approx(_hand_mmd2(NST_S, NST_T), rel=RTOL)
    got = nst_mmd2(t32(NST_S), t32(NST_T), degree=3, c=1.0).item()
    assert got == pytest.approx(_hand_mmd2(NST_S, NST_T, d=3, c=1.0), rel=RTOL)
    # summed over layer pairs
    two = nst_loss([t32(NST_S), t32(NST_T)], [t32(NST_T), t32(NST_S)]).item()
    assert two == pytest.approx(_hand_mmd2(NST_S, NST_T) + _hand_mmd2(NST_T, NST_S), rel=RTOL)


def test_nst_pools_the_larger_map_and_equals_the_position_gram_distance():
    # teacher of length 6: adjacent positions averaged down to the student's length 3
    t6 = np.repeat(NST_T, 2, axis=2) + np.array([0.5, -0.5] * 3)  # pair means are NST_T
    assert nst_mmd2(t32(NST_S), t32(t6)).item() == pytest.approx(_hand_mmd2(NST_S, NST_T), rel=RTOL)
    # d = 2, c = 0: || T^T T / C_t - S^T S / C_s ||_F^2 with rows the normalised channels
    s = t64(NST_S) / t64(NST_S).norm(dim=2, keepdim=True)
    t = t64(NST_T) / t64(NST_T).norm(dim=2, keepdim=True)
    gram = (t.transpose(1, 2) @ t / 3 - s.transpose(1, 2) @ s / 2).pow(2).sum((1, 2)).mean()
    assert nst_mmd2(t64(NST_S), t64(NST_T)).item() == pytest.approx(gram.item(), rel=1e-12)


def test_nst_is_zero_for_equal_maps_and_rejects_bad_kernels():
    torch.manual_seed(2)
    f = torch.randn(3, 4, 5, 5)
    assert nst_loss(f.clone(), f).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(KDConfigError, match="degree must be an integer >= 1"):
        nst_loss(f, f, degree=0)
    with pytest.raises(KDConfigError, match="degree must be an integer >= 1"):
        nst_loss(f, f, degree=1.5)
    with pytest.raises(KDConfigError, match="offset c must be >= 0"):
        nst_loss(f, f, c=-1.0)
    with pytest.raises(ValueError, match="feature map"):
        nst_loss(torch.randn(3, 4), torch.randn(3, 4))


# ---- CC (Peng et al. 2019) ------------------------------------------------------------------
def _hand_cc_matrix(x: np.ndarray, gamma: float, order: int, normalize: bool) -> np.ndarray:
    rows = [r / np.linalg.norm(r) if normalize else r for r in x]
    n = len(rows)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            d = float(np.dot(rows[i], rows[j]))
            out[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * d**p
                            for p in range(order + 1))
    return out


CC_S = np.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 1.0]])
CC_T = np.array([[0.2, 1.0, 0.5], [1.0, 0.0, 1.0], [0.0, -1.0, 2.0]])


@pytest.mark.parametrize("normalize", [True, False])
def test_cc_matches_hand_computed_value(normalize):
    cs = _hand_cc_matrix(CC_S, 0.4, 2, normalize)
    ct = _hand_cc_matrix(CC_T, 0.4, 2, normalize)
    expected = ((ct - cs) ** 2).sum() / 9  # squared Frobenius distance / n^2
    got = cc_loss(t32(CC_S), t32(CC_T), gamma=0.4, order=2, normalize=normalize)
    assert got.item() == pytest.approx(expected, rel=RTOL)


def test_cc_taylor_expansion_converges_to_the_gaussian_rbf_on_unit_vectors():
    x = t64(CC_T)
    xn = x / x.norm(dim=1, keepdim=True)
    rbf = torch.exp(-0.4 * torch.cdist(xn, xn).pow(2))
    torch.testing.assert_close(cc_correlation_matrix(x, gamma=0.4, order=25), rbf)
    # P = 2 is already a close approximation for gamma = 0.4
    assert (cc_correlation_matrix(x, 0.4, 2) - rbf).abs().max().item() < 0.05


def test_cc_rejects_bad_hyperparameters():
    s, t = torch.randn(3, 2), torch.randn(3, 4)
    with pytest.raises(KDConfigError, match="Taylor order P must be an integer >= 1"):
        cc_loss(s, t, order=0)
    with pytest.raises(KDConfigError, match="Taylor order P must be an integer >= 1"):
        cc_loss(s, t, order=2.0)
    with pytest.raises(KDConfigError, match="gamma must be > 0"):
        cc_loss(s, t, gamma=0.0)
    with pytest.raises(KDConfigError, match="same examples"):
        cc_loss(s, torch.randn(4, 4))


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
    assert total.item() == pytest.approx(tc_h.mean() + 8 * nc_h.mean(), rel=RTOL)


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
    assert got.item() == pytest.approx(_hand_ls_kd(s, t, 2.0), rel=RTOL)
    got1 = standardized_kd_loss(t32(s), t32(t), temperature=3.0, correction=1)
    assert got1.item() == pytest.approx(_hand_ls_kd(s, t, 3.0, ddof=1), rel=RTOL)
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


# ---- all losses: teacher constant, bf16 autocast safe ---------------------------------------
def _cases():
    torch.manual_seed(5)
    logits_s, logits_t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    emb_s, emb_t = torch.randn(4, 6), torch.randn(4, 3)
    map_s, map_t = torch.randn(4, 3, 4, 4), torch.randn(4, 2, 4, 4)
    return {
        "sp": (lambda s, t: sp_loss(s, t), map_s, map_t),
        "pkt": (lambda s, t: pkt_loss(s, t), emb_s, emb_t),
        "nst": (lambda s, t: nst_loss(s, t), map_s, map_t),
        "cc": (lambda s, t: cc_loss(s, t), emb_s, emb_t),
        "dkd": (lambda s, t: dkd_loss(s, t, y), logits_s, logits_t),
        "dist": (lambda s, t: dist_loss(s, t, temperature=4.0), logits_s, logits_t),
        "ls_kd": (lambda s, t: standardized_kd_loss(s, t), logits_s, logits_t),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_teacher_is_a_constant_and_bf16_autocast_computes_in_float32(name):
    fn, s, t = _cases()[name]
    s, t = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    fn(s, t).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()
    ref = fn(s.detach().bfloat16().float(), t.detach().bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(s.detach().bfloat16(), t.detach().bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
