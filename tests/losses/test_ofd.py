"""OFD: the margin (expected negative response), the partial L2 distance and the stage weights."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_lightning import KDConfigError
from kd_lightning.losses import ofd_loss, ofd_margin, ofd_margin_from_bn, ofd_partial_l2, ofd_stage_weights


REL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


# =============================================================================================
# OFD (Heo et al., ICCV 2019)
# =============================================================================================
def _negative_mean_by_integration(mu: float, sigma: float) -> float:
    """E[x | x < 0] for x ~ N(mu, sigma^2) by trapezoid integration (independent of erf)."""
    x = np.linspace(mu - 14 * sigma, 0.0, 400001)
    dens = np.exp(-0.5 * ((x - mu) / sigma) ** 2)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy < 2 names it trapz
    return float(trapezoid(x * dens, x) / trapezoid(dens, x))


def test_ofd_margin_is_the_expected_negative_response():
    gamma = torch.tensor([1.0, -2.0, 0.5, 1.0, 0.0, 0.0])
    beta = torch.tensor([0.0, 0.5, -1.0, 4.0, -0.3, 2.0])
    m = ofd_margin(gamma, beta)
    assert m.dtype == torch.float32 and m.shape == (6,)
    for c in range(3):
        expected = _negative_mean_by_integration(float(beta[c]), abs(float(gamma[c])))
        assert m[c].item() == pytest.approx(expected, rel=1e-5)
    assert m[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=REL)
    # negative mass Phi(-4) < 1e-3: the authors' fallback -3 |gamma|
    assert m[3].item() == pytest.approx(-3.0)
    # a constant channel: its value if negative, else 0
    assert m[4].item() == pytest.approx(-0.3) and m[5].item() == 0.0
    assert bool((m <= 0).all())

    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(gamma[:3])
        bn.bias.copy_(beta[:3])
    assert torch.equal(ofd_margin_from_bn(bn), m[:3])
    with pytest.raises(KDConfigError, match="affine"):
        ofd_margin_from_bn(torch.nn.BatchNorm2d(3, affine=False))


def _partial_l2_explicit(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> float:
    sd, td, md = s.double().numpy(), t.double().numpy(), m.double().numpy()
    total = 0.0
    for idx in itertools.product(*(range(n) for n in sd.shape)):
        target = max(td[idx], md[idx[1]])
        if sd[idx] <= target <= 0:
            continue
        total += (target - sd[idx]) ** 2
    return total / sd.shape[0]


def test_ofd_partial_l2_matches_explicit_cases():
    margin = torch.tensor([-0.5, -1.0])
    # channel 0: every case of the partial L2 at least once
    s = torch.tensor([[[[-2.0, 0.3], [1.0, -0.2]], [[-3.0, -0.5], [0.5, 2.0]]],
                      [[[-0.1, -0.7], [0.0, 0.9]], [[-1.2, -0.9], [-2.0, 1.0]]]])
    t = torch.tensor([[[[-1.0, -2.0], [0.5, -0.1]], [[-4.0, -0.5], [1.5, -3.0]]],
                      [[[-0.3, -0.6], [2.0, -5.0]], [[-0.8, -1.5], [0.2, 0.1]]]])
    assert ofd_partial_l2(s, t, margin).item() == pytest.approx(
        _partial_l2_explicit(s, t, margin), rel=REL)
    s2, t2, m2 = randn(3, 4, 2, 3, seed=1), randn(3, 4, 2, 3, seed=2), -randn(4, seed=3).abs()
    assert ofd_partial_l2(s2, t2, m2).item() == pytest.approx(
        _partial_l2_explicit(s2, t2, m2), rel=REL)


def test_ofd_partial_l2_gradient_mask():
    s = randn(2, 3, 4, 4, seed=4).requires_grad_(True)
    t, margin = randn(2, 3, 4, 4, seed=5), torch.tensor([-0.3, -0.8, -1.5])
    ofd_partial_l2(s, t, margin).backward()
    target = torch.maximum(t, margin.view(1, 3, 1, 1))
    silent = (s.detach() <= target) & (target <= 0)
    assert silent.any() and (~silent).any()
    assert torch.all(s.grad[silent] == 0)
    expected = 2 * (s.detach() - target) / 2
    assert torch.allclose(s.grad[~silent], expected[~silent], atol=1e-6)
    # the teacher feature receives no gradient
    tt = t.clone().requires_grad_(True)
    ofd_partial_l2(s, tt, margin).backward()
    assert tt.grad is None


def test_ofd_loss_weights_stages_from_deep_to_shallow():
    assert ofd_stage_weights(3) == [0.25, 0.5, 1.0]
    feats_s = [randn(2, 2, 4, 4, seed=i) for i in range(3)]
    feats_t = [randn(2, 2, 4, 4, seed=10 + i) for i in range(3)]
    margins = [torch.tensor([-0.4, -0.9])] * 3
    expected = sum(w * _partial_l2_explicit(s, t, m)
                   for w, s, t, m in zip([0.25, 0.5, 1.0], feats_s, feats_t, margins))
    assert ofd_loss(feats_s, feats_t, margins).item() == pytest.approx(expected, rel=REL)
    # a larger teacher map is pooled to the student's size before the margin
    big_t = randn(2, 2, 8, 8, seed=20)
    assert ofd_partial_l2(feats_s[0], big_t, margins[0]).item() == pytest.approx(
        _partial_l2_explicit(feats_s[0], F.avg_pool2d(big_t, 2), margins[0]), rel=REL)


def test_ofd_bad_inputs_raise_one_clear_error():
    with pytest.raises(KDConfigError, match="connector"):
        ofd_partial_l2(randn(2, 3, 2, 2), randn(2, 4, 2, 2), torch.zeros(4))
    with pytest.raises(KDConfigError, match="3 margins for 2 channels"):
        ofd_partial_l2(randn(2, 2, 2, 2), randn(2, 2, 2, 2), torch.zeros(3))
    with pytest.raises(KDConfigError, match="one margin per student feature"):
        ofd_loss([randn(2, 2, 2, 2)], [randn(2, 2, 2, 2)], [])
    with pytest.raises(KDConfigError, match="one entry per channel"):
        ofd_margin(torch.ones(3), torch.ones(2))
