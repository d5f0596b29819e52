"""The Wasserstein-ball penalty: the input-gradient norm and its gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.func import functional_call

from kd_lightning.losses import input_gradient_norm, wasserstein_kd_loss


F64 = torch.float64


# ---- Wasserstein term ----------------------------------------------------------------------
def _kd64(zs: torch.Tensor, zt: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Per-example T^2 KL(softmax(zt/T) || softmax(zs/T)), kept in float64 for the checks."""
    log_ps, log_pt = F.log_softmax(zs / temperature, -1), F.log_softmax(zt / temperature, -1)
    return temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def _tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    x, zt = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    names = [n for n, _ in net.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())
    return net, x, zt, names, params


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_wasserstein_penalty_gradient_matches_finite_differences(p):
    net, x, zt, names, params = _tiny()

    def objective(*ps, eps=0.7, which=0):
        xi = x.clone().requires_grad_(True)
        per = _kd64(functional_call(net, dict(zip(names, ps)), (xi,)), zt)
        return wasserstein_kd_loss(per, xi, eps, p)[which]

    # the penalty alone (mean ||grad_x l||) and L_W: analytic gradients need double backprop
    assert gradcheck(lambda *ps: objective(*ps, which=2), params, eps=1e-6, atol=1e-6)
    assert gradcheck(lambda *ps: objective(*ps, which=0), params, eps=1e-6, atol=1e-6)
    grads = torch.autograd.grad(objective(*params, which=2), params)
    assert all(gr.abs().sum() > 0 for gr in grads)  # the penalty really depends on the weights


def test_input_gradient_norm_is_per_example_and_only_differentiable_with_create_graph():
    net, x, zt, names, params = _tiny()
    xi = x.clone().requires_grad_(True)
    per = _kd64(net(xi), zt)
    norms = input_gradient_norm(per, xi)
    for i in range(len(x)):  # one backward of the sum gives every example's own gradient
        (gi,) = torch.autograd.grad(per[i], xi, retain_graph=True)
        assert norms[i].item() == pytest.approx(gi[i].norm().item(), rel=1e-10)
        assert gi[[j for j in range(len(x)) if j != i]].abs().max() == 0
    assert norms.requires_grad
    assert not input_gradient_norm(per, xi, create_graph=False).requires_grad
    inf_norm = input_gradient_norm(per, xi, p=math.inf)
    assert torch.all(inf_norm <= norms + 1e-12)


def test_wasserstein_penalty_is_zero_when_eps_is_zero():
    net, x, zt, names, params = _tiny()
    xi = x.clone().requires_grad_(True)
    per = _kd64(functional_call(net, dict(zip(names, params)), (xi,)), zt)
    total, fit, grad_norm = wasserstein_kd_loss(per, xi, eps=0.0)
    assert total.item() == fit.item() and grad_norm.item() > 0 and not grad_norm.requires_grad
    g_total = torch.autograd.grad(total, params, retain_graph=True)
    g_fit = torch.autograd.grad(per.mean(), params)
    for a, b in zip(g_total, g_fit):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="eps"):
        wasserstein_kd_loss(per, xi, eps=-0.1)
