"""FSP matrices (Yim et al., CVPR 2017, seed 003, Eq. 1) are defined between two maps of the same
h x w; the CRD benchmark's pooled variant is an explicit option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning import KDConfigError
from kd_lightning.losses import fsp_matrix


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
