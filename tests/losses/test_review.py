"""ReviewKD: the review chain, attention-based fusion (ABF) and the hierarchical context loss."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.losses import ABF, build_abfs, hcl_loss, review_chain


REL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


# =============================================================================================
# ReviewKD (Chen et al., CVPR 2021)
# =============================================================================================
def test_review_chain_output_shapes_follow_the_teacher():
    abfs = build_abfs([4, 8, 8], [6, 10, 12])
    assert [a.fuse for a in abfs] == [True, True, False]
    assert all(a.mid_channels == 8 for a in abfs)  # min(512, deepest student channels)
    student = [randn(2, 4, 8, 8, seed=1), randn(2, 8, 4, 4, seed=2), randn(2, 8, seed=3)]
    outs = review_chain(student, abfs, out_sizes=[(16, 16), (4, 4), (1, 1)])
    assert [tuple(o.shape) for o in outs] == [(2, 6, 16, 16), (2, 10, 4, 4), (2, 12, 1, 1)]
    assert [tuple(o.shape) for o in review_chain(student, abfs)] == [
        (2, 6, 8, 8), (2, 10, 4, 4), (2, 12, 1, 1)]
    outs_1d = review_chain([randn(2, 3, 12), randn(2, 5, 6)], build_abfs([3, 5], [4, 7], dims=1))
    assert [tuple(o.shape) for o in outs_1d] == [(2, 4, 12), (2, 7, 6)]


def test_abf_fuses_with_two_channel_attention():
    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=True).eval()
    x, residual = randn(2, 3, 4, 4, seed=1), randn(2, 4, 2, 2, seed=2)
    y, fused = abf(x, residual)
    with torch.no_grad():
        xp = abf.conv1(x).double()
        up = residual.double().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest
        w, b = abf.att_conv[0].weight.double().view(2, 8), abf.att_conv[0].bias.double()
        expected = torch.zeros_like(xp)
        for n, i, j in itertools.product(range(2), range(4), range(4)):
            z = torch.cat([xp[n, :, i, j], up[n, :, i, j]])
            a = torch.sigmoid(w @ z + b)
            expected[n, :, i, j] = a[0] * xp[n, :, i, j] + a[1] * up[n, :, i, j]
    assert torch.allclose(fused.double(), expected, atol=1e-6)
    assert torch.allclose(y, abf.conv2(fused), atol=1e-6)


def _block_mean(a: np.ndarray, size: int) -> np.ndarray:
    n, c, h, w = a.shape
    out = np.zeros((n, c, size, size))
    for i, j in itertools.product(range(size), range(size)):
        out[:, :, i, j] = a[:, :, i * h // size:(i + 1) * h // size,
                            j * w // size:(j + 1) * w // size].mean(axis=(2, 3))
    return out


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum((x - y) ** 2 for x, y in zip(a.flat, b.flat)) / a.size)


def test_hcl_loss_matches_explicit_pyramid():
    fs = [randn(2, 3, 8, 8, seed=1), randn(2, 3, 4, 4, seed=2), randn(2, 3, 1, 1, seed=3)]
    ft = [randn(2, 3, 8, 8, seed=4), randn(2, 3, 4, 4, seed=5), randn(2, 3, seed=6)]
    s = [f.double().numpy() for f in fs]
    t = [f.double().numpy() for f in ft[:2]] + [ft[2].double().numpy().reshape(2, 3, 1, 1)]
    # 8x8: full 1, pooled 4/2/1 with 1/2, 1/4, 1/8; 4x4: level 4 skipped, 2/1 with 1/2, 1/4
    l8 = (_mse(s[0], t[0]) + 0.5 * _mse(_block_mean(s[0], 4), _block_mean(t[0], 4))
          + 0.25 * _mse(_block_mean(s[0], 2), _block_mean(t[0], 2))
          + 0.125 * _mse(_block_mean(s[0], 1), _block_mean(t[0], 1))) / 1.875
    l4 = (_mse(s[1], t[1]) + 0.5 * _mse(_block_mean(s[1], 2), _block_mean(t[1], 2))
          + 0.25 * _mse(_block_mean(s[1], 1), _block_mean(t[1], 1))) / 1.75
    l1 = _mse(s[2], t[2])
    assert hcl_loss(fs, ft).item() == pytest.approx(l8 + l4 + l1, rel=REL)


def test_reviewkd_bad_inputs_raise_one_clear_error():
    abfs = build_abfs([4, 8], [6, 10])
    with pytest.raises(KDConfigError, match="one ABF per student level"):
        review_chain([randn(2, 4, 4, 4)], abfs)
    with pytest.raises(KDConfigError, match="fuse=False"):
        review_chain([randn(2, 4, 4, 4), randn(2, 8, 2, 2)], list(abfs)[::-1])
    with pytest.raises(KDConfigError, match=r"\[B, 4, \.\.\.\]"):
        review_chain([randn(2, 5, 4, 4), randn(2, 8, 2, 2)], abfs)
    with pytest.raises(KDConfigError, match="out_sizes"):
        hcl_loss([randn(2, 6, 4, 4)], [randn(2, 6, 8, 8)])
    with pytest.raises(KDConfigError, match="decreasing"):
        hcl_loss([randn(2, 6, 4, 4)], [randn(2, 6, 4, 4)], levels=(1, 2))
    with pytest.raises(KDConfigError, match="one teacher level per student level"):
        build_abfs([4, 8], [6])
