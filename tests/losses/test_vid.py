"""VID loss and regressors against the explicit Gaussian negative log-likelihood."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kd_lightning import KDConfigError
from kd_lightning.losses import VIDRegressor, vid_loss


REL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def softplus64(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid64(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# =============================================================================================
# VID (Ahn et al., CVPR 2019)
# =============================================================================================
def test_vid_loss_matches_explicit_gaussian_nll():
    mean, teacher = randn(2, 3, 2, 2, seed=1), randn(2, 3, 2, 2, seed=2)
    variance = torch.tensor([0.5, 2.0, 5.0])
    m, t, v = mean.double().numpy(), teacher.double().numpy(), variance.double().numpy()
    total, count = 0.0, 0
    for b, c, h, w in itertools.product(range(2), range(3), range(2), range(2)):
        total += 0.5 * (math.log(v[c]) + (t[b, c, h, w] - m[b, c, h, w]) ** 2 / v[c])
        count += 1
    assert vid_loss(mean, variance, teacher).item() == pytest.approx(total / count, rel=REL)


def test_vid_regressor_initial_variance_and_layers():
    reg = VIDRegressor(4, 6, init_variance=5.0, eps=1e-5)
    assert torch.allclose(reg.variance(), torch.full((6,), 5.0), atol=1e-6)
    convs = [m for m in reg.mean if isinstance(m, torch.nn.Conv2d)]
    # three 1x1 convolutions without bias, C_s -> C_t -> C_t -> C_t (mid defaults to C_t)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [
        (4, 6, (1, 1), None), (6, 6, (1, 1), None), (6, 6, (1, 1), None)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in reg.mean) == 2
    mu, var = reg(randn(2, 4, 3, 3))
    assert mu.shape == (2, 6, 3, 3) and var.shape == (6,)
    # 1D maps and vectors
    assert VIDRegressor(4, 6, dims=1)(randn(2, 4, 7))[0].shape == (2, 6, 7)
    assert VIDRegressor(4, 6, dims=0)(randn(2, 4))[0].shape == (2, 6)


def test_vid_gradient_of_variance_parameter_matches_hand_derivation():
    # L = mean 0.5 (log v_c + r^2 / v_c), v_c = softplus(alpha_c) + eps, r = t - mu
    # dL/dalpha_c = (1/n) sum_{b,p} 0.5 (1/v_c - r^2/v_c^2) * sigmoid(alpha_c)
    torch.manual_seed(0)
    reg = VIDRegressor(3, 2, init_variance=0.7, eps=1e-5)
    with torch.no_grad():
        reg.alpha.copy_(torch.tensor([-0.4, 1.3]))
    s, t = randn(2, 3, 2, 2, seed=3), randn(2, 2, 2, 2, seed=4)
    mu, var = reg(s)
    vid_loss(mu, var, t).backward()
    r = (t - mu.detach()).double().numpy()
    n = r.size
    for c in range(2):
        a = float(reg.alpha[c].detach())
        v = softplus64(a) + 1e-5
        terms = [0.5 * (1 / v - r[b, c, h, w] ** 2 / v**2) * sigmoid64(a)
                 for b, h, w in itertools.product(range(2), range(2), range(2))]
        expected = sum(terms) / n
        # float32 terms of either sign (cancellation): a sum of 8 terms, each ~10 roundings,
        # is off by at most (8 + 10) eps32 times the sum of their magnitudes / n
        bound = 18 * torch.finfo(torch.float32).eps * sum(map(abs, terms)) / n
        assert reg.alpha.grad[c].item() == pytest.approx(expected, rel=0, abs=bound)


def test_vid_pools_a_larger_teacher_map():
    mean, teacher = randn(1, 2, 2, 2, seed=5), randn(1, 2, 4, 4, seed=6)
    var = torch.tensor([1.0, 3.0])
    expected = vid_loss(mean, var, F.avg_pool2d(teacher, 2))
    assert vid_loss(mean, var, teacher).item() == pytest.approx(expected.item(), rel=REL)


def test_vid_bad_inputs_raise_one_clear_error():
    with pytest.raises(KDConfigError, match="out_channels equal to the teacher"):
        vid_loss(randn(2, 3, 2, 2), torch.ones(3), randn(2, 4, 2, 2))
    with pytest.raises(KDConfigError, match="one value per teacher channel"):
        vid_loss(randn(2, 3, 2, 2), torch.ones(2), randn(2, 3, 2, 2))
    with pytest.raises(KDConfigError, match="init_variance"):
        VIDRegressor(2, 2, init_variance=0.0)
    with pytest.raises(KDConfigError, match="eps"):
        VIDRegressor(2, 2, eps=0.0)
    with pytest.raises(KDConfigError, match="dims"):
        VIDRegressor(2, 2, dims=3)
    with pytest.raises(KDConfigError, match=r"\[B, C, H, W\] map"):
        VIDRegressor(2, 2)(randn(2, 2, 5))
