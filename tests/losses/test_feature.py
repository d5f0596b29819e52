"""Feature-distillation losses against values computed by hand on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning import KDConfigError
from kd_lightning.losses import (ab_loss, at_loss, attention_map, fsp_loss, fsp_matrix, hint_loss,
                                 pool_to_smaller)
from kd_lightning.models import build_connector


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---- pooling --------------------------------------------------------------------------------
def test_pool_to_smaller_averages_the_larger_map_down():
    a = t([[[1, 3, 5, 7]]])  # [1, 1, 4]
    b = t([[[2, 4]], [[6, 8]]]).reshape(1, 2, 2)  # [1, 2, 2]
    pa, pb = pool_to_smaller(a, b)
    assert torch.equal(pa, t([[[2, 6]]])) and pb is b
    a2 = t([[[[1, 2], [3, 4]]]])  # [1, 1, 2, 2]
    b2 = t([[[[5]]]])  # [1, 1, 1, 1]
    pa2, pb2 = pool_to_smaller(a2, b2)
    assert pa2.flatten().tolist() == [2.5] and pb2 is b2
    with pytest.raises(ValueError, match="1D map .* 2D map"):
        pool_to_smaller(a, a2)


# ---- hint (FitNets) -------------------------------------------------------------------------
def test_hint_loss_hand_values():
    # vectors: ((1-0)^2 + 0 + 0 + (4-6)^2) / 4
    assert hint_loss(t([[1, 2], [3, 4]]), t([[0, 2], [3, 6]])).item() == pytest.approx(1.25)
    # a 1D map of length 4 against one of length 2: the student's is pooled to [1.5, 3.5]
    s, tt = t([[[1, 2, 3, 4]]]), t([[[1, 5]]])
    assert hint_loss(s, tt).item() == pytest.approx((0.5**2 + 1.5**2) / 2)
    # 2D maps of equal size
    s2, t2 = t([[[[1, 2], [3, 4]]]]), t([[[[1, 0], [3, 2]]]])
    assert hint_loss(s2, t2).item() == pytest.approx((0 + 4 + 0 + 4) / 4)


# ---- FSP (Yim et al. 2017) --------------------------------------------------------------------
def test_fsp_matrix_2d_hand_value():
    # F1: 2 channels on a 1x2 grid, F2: 1 channel; G_ij = sum_{s,t} F1_i F2_j / (h*w)
    f1 = t([[[[1, 2]], [[0, 1]]]])  # [1, 2, 1, 2]
    f2 = t([[[[3, 4]]]])  # [1, 1, 1, 2]
    g = fsp_matrix(f1, f2)
    assert g.shape == (1, 2, 1)
    assert g.flatten().tolist() == pytest.approx([(1 * 3 + 2 * 4) / 2, (0 * 3 + 1 * 4) / 2])


def test_fsp_matrix_2d_seed_formula_on_random_maps():
    f1, f2 = torch.randn(3, 4, 5, 6), torch.randn(3, 2, 5, 6)
    g = fsp_matrix(f1, f2)
    h, w = 5, 6
    expected = torch.zeros(3, 4, 2)
    for b in range(3):
        for i in range(4):
            for j in range(2):
                expected[b, i, j] = sum(f1[b, i, s, u] * f2[b, j, s, u]
                                        for s in range(h) for u in range(w)) / (h * w)
    assert torch.allclose(g, expected, atol=1e-5)


def test_fsp_matrix_1d_hand_value():
    f1 = t([[[1, 2, 3]]])  # [1, 1, 3]
    f2 = t([[[1, 0, 1], [2, 2, 2]]])  # [1, 2, 3]
    g = fsp_matrix(f1, f2)
    assert g.shape == (1, 1, 2)
    assert g.flatten().tolist() == pytest.approx([(1 + 0 + 3) / 3, (2 + 4 + 6) / 3])


def test_fsp_matrix_pools_the_larger_map_when_asked():
    # 1D: [1, 3, 5, 7] pooled to [2, 6] against [2, 4]: (2*2 + 6*4) / 2
    assert fsp_matrix(t([[[1, 3, 5, 7]]]), t([[[2, 4]]]), pool="smaller").item() == pytest.approx(14.0)
    # 2D: a 2x2 map pooled to its mean 2.5 against a 1x1 map of 2
    assert fsp_matrix(t([[[[1, 2], [3, 4]]]]), t([[[[2]]]]), pool="smaller").item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="feature map"):
        fsp_matrix(t([[1, 2]]), t([[[1, 2]]]))


def test_fsp_loss_is_mean_over_examples_of_weighted_squared_frobenius_distances():
    # one pair, two examples: ||G_T - G_S||^2 = (3-1)^2 = 4 and 0 -> mean 2
    gs, gt = t([[[1.0]], [[2.0]]]), t([[[3.0]], [[2.0]]])
    assert fsp_loss([gs], [gt]).item() == pytest.approx(2.0)
    # two pairs with lambda = (1, 0.5); second pair 1x2 matrices
    gs2, gt2 = t([[[0, 1]], [[1, 1]]]), t([[[2, 1]], [[1, 4]]])
    # example 1: 4 + 0.5 * (4 + 0) = 6; example 2: 0 + 0.5 * (0 + 9) = 4.5
    got = fsp_loss([gs, gs2], [gt, gt2], weights=[1.0, 0.5])
    assert got.item() == pytest.approx((6 + 4.5) / 2)
    # equal lambdas by default
    assert fsp_loss([gs, gs2], [gt, gt2]).item() == pytest.approx(((4 + 4) + (0 + 9)) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        fsp_loss([gs], [gt2])


# ---- activation boundaries (Heo et al. 2019) --------------------------------------------------
def test_ab_loss_hand_values():
    s = t([[-2.0, -0.5, 0.5, 2.0, 0.5, -2.0, 0.0],
           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    tt = t([[-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 0.0],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    # example 1, m = 1: inactive teacher (t <= 0, including t = 0): (s+1)^2 where s > -1
    #   s=-2 -> 0, s=-0.5 -> 0.25, s=0.5 -> 2.25, s=0 (t=0) -> 1
    # active teacher (t > 0): (s-1)^2 where s <= 1:  s=2 -> 0, s=0.5 -> 0.25, s=-2 -> 9
    ex1 = 0.25 + 2.25 + 1 + 0.25 + 9
    ex2 = 7 * 1.0  # all active, s = 0: (0 - 1)^2 each
    assert ab_loss(s, tt, margin=1.0).item() == pytest.approx((ex1 + ex2) / 2)
    # margin 2 on one neuron: s = 1.5 < 2 with an active teacher -> (1.5 - 2)^2
    assert ab_loss(t([[1.5]]), t([[3.0]]), margin=2.0).item() == pytest.approx(0.25)
    # only the teacher's sign matters
    assert ab_loss(s, tt * 7.0).item() == pytest.approx(ab_loss(s, tt).item())


def test_ab_loss_on_maps_sums_neurons_and_positions():
    s = torch.randn(2, 3, 4)
    tt = torch.randn(2, 3, 4)
    flat = ab_loss(s.flatten(1), tt.flatten(1))
    assert ab_loss(s, tt).item() == pytest.approx(flat.item(), rel=1e-6)
    s2, t2 = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    assert ab_loss(s2, t2).item() == pytest.approx(ab_loss(s2.flatten(1), t2.flatten(1)).item(), rel=1e-6)


# ---- attention transfer (Zagoruyko & Komodakis 2017) ------------------------------------------
def test_attention_map_is_channel_mean_of_squares():
    f = t([[[1, 0], [1, 2]]])  # [1, 2, 2]: channels [1, 0] and [1, 2]
    assert attention_map(f).tolist() == [[1.0, 2.0]]
    f2 = t([[[[1, 2]], [[3, 0]]]])  # [1, 2, 1, 2]
    assert attention_map(f2).tolist() == [[[5.0, 2.0]]]


def test_at_loss_1d_hand_value():
    fs = t([[[1, 0], [1, 2]]])  # Q_s = [1, 2] -> [1, 2] / sqrt(5)
    ft = t([[[2, 0]]])  # Q_t = [4, 0] -> [1, 0]
    r5 = math.sqrt(5)
    expected = ((1 / r5 - 1) ** 2 + (2 / r5) ** 2) / 2
    assert at_loss([fs], [ft]).item() == pytest.approx(expected, rel=1e-6)


def test_at_loss_2d_hand_value_and_channel_counts_may_differ():
    fs = t([[[[1, 0], [0, 1]]]])  # [1, 1, 2, 2]: Q_s = [1, 0, 0, 1] / sqrt(2)
    ft = torch.zeros(1, 2, 2, 2)
    ft[0, 0, 0, 0] = 2.0  # Q_t = [2, 0, 0, 0] -> [1, 0, 0, 0]
    r2 = math.sqrt(2)
    expected = ((1 / r2 - 1) ** 2 + (1 / r2) ** 2) / 4
    assert at_loss([fs], [ft]).item() == pytest.approx(expected, rel=1e-6)


def test_at_loss_pools_the_larger_attention_map_and_sums_layers():
    fs, ft = torch.randn(3, 4, 4, 4), torch.randn(3, 8, 2, 2)
    qs = torch.nn.functional.avg_pool2d(attention_map(fs).unsqueeze(1), 2).flatten(1)
    qt = attention_map(ft).flatten(1)
    manual = (qs / qs.norm(dim=1, keepdim=True) - qt / qt.norm(dim=1, keepdim=True)).pow(2).mean()
    assert at_loss([fs], [ft]).item() == pytest.approx(manual.item(), rel=1e-5)
    g1, h1 = torch.randn(3, 2, 6), torch.randn(3, 5, 6)
    total = at_loss([fs, g1], [ft, h1])
    assert total.item() == pytest.approx((at_loss([fs], [ft]) + at_loss([g1], [h1])).item(), rel=1e-6)
    assert at_loss([fs], [fs * 3]).item() == pytest.approx(0.0, abs=1e-10)  # scale-invariant


# ---- gradients: into the student (and connectors), never into the teacher ---------------------
@pytest.mark.parametrize("name", ["hint", "fsp", "ab", "at"])
def test_gradients_reach_student_and_connector_never_teacher(name):
    torch.manual_seed(0)
    student_feat = torch.randn(4, 3, 6, requires_grad=True)
    teacher_feat = torch.randn(4, 5, 6, requires_grad=True)  # a leaf that must stay untouched
    connector = build_connector((3, 6), (5, 6))
    if name == "hint":
        loss = hint_loss(connector(student_feat), teacher_feat)
    elif name == "ab":
        loss = ab_loss(connector(student_feat), teacher_feat)
    elif name == "at":
        loss = at_loss([connector(student_feat)], [teacher_feat])
    else:
        s2 = torch.randn(4, 5, 6, requires_grad=True)  # FSP pairs maps of the same length
        loss = fsp_loss([fsp_matrix(connector(student_feat), s2)], [fsp_matrix(teacher_feat, teacher_feat)])
    loss.backward()
    assert teacher_feat.grad is None
    assert student_feat.grad is not None and student_feat.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in connector.parameters())


@pytest.mark.parametrize("fn", ["hint", "fsp", "ab", "at"])
def test_losses_are_float32_for_bfloat16_features(fn):
    s, tt = torch.randn(2, 4, 8).bfloat16(), torch.randn(2, 4, 8).bfloat16()
    out = {"hint": lambda: hint_loss(s, tt), "ab": lambda: ab_loss(s, tt),
           "at": lambda: at_loss([s], [tt]),
           "fsp": lambda: fsp_loss([fsp_matrix(s, s)], [fsp_matrix(tt, tt)])}[fn]()
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_fsp_matrix_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    a, b = torch.randn(3, 8, 10), torch.randn(3, 6, 10)
    ref = fsp_matrix(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fsp_matrix(a, b)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-6)


def _g_by_hand_2d(f1, f2):
    b, m, h, w = f1.shape
    n = f2.shape[1]
    g = torch.zeros(b, m, n, dtype=torch.float64)
    for x in range(b):
        for i in range(m):
            for j in range(n):
                g[x, i, j] = sum(float(f1[x, i, s, u]) * float(f2[x, j, s, u])
                                 for s in range(h) for u in range(w)) / (h * w)
    return g


def _g_by_hand_1d(f1, f2):
    b, m, length = f1.shape
    n = f2.shape[1]
    g = torch.zeros(b, m, n, dtype=torch.float64)
    for x in range(b):
        for i in range(m):
            for j in range(n):
                g[x, i, j] = sum(float(f1[x, i, s]) * float(f2[x, j, s]) for s in range(length)) / length
    return g


def test_same_size_2d_maps_give_eq_1_by_hand():
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    got = fsp_matrix(f1, f2)
    assert got.shape == (2, 3, 6) and got.dtype == torch.float32
    assert torch.allclose(got.double(), _g_by_hand_2d(f1, f2), atol=1e-6)
    # a 1x2 grid worked out on paper: G = [(1*3 + 2*4)/2, (0*3 + 1*4)/2]
    small = fsp_matrix(torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]]), torch.tensor([[[[3.0, 4.0]]]]))
    assert small.flatten().tolist() == [5.5, 2.0]


def test_same_size_1d_maps_give_eq_1_by_hand():
    g = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(3, 4, 7, generator=g), torch.randn(3, 2, 7, generator=g)
    got = fsp_matrix(f1, f2)
    assert got.shape == (3, 4, 2)
    assert torch.allclose(got.double(), _g_by_hand_1d(f1, f2), atol=1e-6)
    # worked out on paper: [1, 2, 3] against [1, 0, 1] and [2, 2, 2]
    small = fsp_matrix(torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[[1.0, 0.0, 1.0], [2.0, 2.0, 2.0]]]))
    assert small.flatten().tolist() == pytest.approx([4 / 3, 4.0])


@pytest.mark.parametrize("shapes", [((2, 3, 19), (2, 4, 10)), ((2, 3, 8, 8), (2, 4, 4, 4)),
                                    ((2, 3, 8, 8), (2, 4, 8, 6)), ((2, 3, 16), (2, 4, 4, 4))])
def test_different_sizes_raise_and_say_how_to_fix_it(shapes):
    f1, f2 = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    with pytest.raises(KDConfigError) as err:
        fsp_matrix(f1, f2)
    msg = str(err.value)
    assert str(tuple(f1.shape)) in msg and str(tuple(f2.shape)) in msg
    assert "same h x w" in msg and "same resolution" in msg and "pool='smaller'" in msg


def test_pooled_variant_is_the_larger_map_average_pooled_then_eq_1():
    g = torch.Generator().manual_seed(2)
    big, small = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    pooled = F.avg_pool2d(big, 2)  # 8x8 -> 4x4, each output the mean of a 2x2 block
    got = fsp_matrix(big, small, pool="smaller")
    assert torch.allclose(got.double(), _g_by_hand_2d(pooled, small), atol=1e-6)
    # 1D, the larger map second: 12 -> 4 positions, each the mean of 3
    short, long_ = torch.randn(2, 4, 4, generator=g), torch.randn(2, 3, 12, generator=g)
    got_1d = fsp_matrix(short, long_, pool="smaller")
    pooled_1d = long_.reshape(2, 3, 4, 3).mean(-1)
    assert got_1d.shape == (2, 4, 3)
    assert torch.allclose(got_1d.double(), _g_by_hand_1d(short, pooled_1d), atol=1e-6)
    # on maps of the same size the option changes nothing
    f1, f2 = torch.randn(2, 3, 5, generator=g), torch.randn(2, 2, 5, generator=g)
    assert torch.equal(fsp_matrix(f1, f2, pool="smaller"), fsp_matrix(f1, f2))


def test_unknown_pool_option_is_rejected():
    with pytest.raises(KDConfigError, match="pool must be None .* or 'smaller'.*'avg'"):
        fsp_matrix(torch.randn(1, 2, 4), torch.randn(1, 2, 4), pool="avg")
