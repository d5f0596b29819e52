"""Losses on features and embeddings: SP, PKT, NST and CC against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.losses import (cc_correlation_matrix, cc_loss, nst_loss, nst_mmd2, pkt_loss,
                                 similarity_matrix, sp_loss)


from tests.conftest import t32, t64

RTOL = 1e-6
EPS32 = torch.finfo(torch.float32).eps


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
    # float32: each probability carries k = 2D + B + 6 roundings (norms, dot products, row sum,
    # divisions); log(p/q) adds both errors and the p-weighted sum over B^2 terms / B^2 bounds the
    # loss's absolute error by 2 k eps32 / B (the loss is small, so this is ~1e-4 relative)
    b, d = s.shape[0], max(s.shape[1], t.shape[1])
    bound = 2 * (2 * d + b + 6) * EPS32 / b
    assert pkt_loss(t32(s), t32(t)).item() == pytest.approx(_hand_pkt(s, t), rel=0, abs=bound)
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
    # a squared difference of two float32 kernel matrices (cancellation): ~100 eps32 relative
    assert got.item() == pytest.approx(expected, rel=1e-5)


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
