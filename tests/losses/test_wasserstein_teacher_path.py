"""Kong et al. 2020, "Learning Student Network with Few Data", Eq. 2: the penalty is the input
gradient of l(o_S(x), o_T(x)), a function of x through both networks (the teacher frozen, its input
not detached)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kd_lightning.losses import input_gradient_norm, kd_loss, wasserstein_kd_loss

F64 = torch.float64
TEMP = 2.0


def _kd64(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """Per-example T^2 KL(softmax(zt/T) || softmax(zs/T)) in float64 (kd_loss computes in float32)."""
    log_ps, log_pt = F.log_softmax(zs / TEMP, -1), F.log_softmax(zt / TEMP, -1)
    return TEMP**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def _nets():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    teacher = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    with torch.no_grad():  # a teacher whose logits vary strongly with x, so its path matters
        teacher[0].weight.mul_(3.0)
    teacher.requires_grad_(False)  # frozen weights; its input is not detached
    x = torch.randn(6, 4, dtype=F64)
    return student, teacher, x


def _per_example(student, teacher, x, through_teacher=True):
    zt = teacher(x) if through_teacher else teacher(x.detach())
    return _kd64(student(x), zt)


def _fd_input_gradients(f, x, h=1e-6):
    """Central differences of l_i w.r.t. x_i (l_i depends on x_i only): ``[B, D]``."""
    g = torch.zeros_like(x)
    for d in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, d] = h
        g[:, d] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_penalty_is_the_input_gradient_through_both_networks(p):
    student, teacher, x = _nets()
    with torch.no_grad():
        g_both = _fd_input_gradients(lambda xx: _kd64(student(xx), teacher(xx)), x)
        g_student_only = _fd_input_gradients(lambda xx: _kd64(student(xx), teacher(x)), x)
    xi = x.clone().requires_grad_(True)
    per = _per_example(student, teacher, xi)
    total, fit, penalty = wasserstein_kd_loss(per, xi, eps=0.5, p=p)
    norms = input_gradient_norm(per, xi, p=p)
    expected = torch.linalg.vector_norm(g_both, ord=p, dim=1)
    assert torch.allclose(norms, expected, rtol=1e-7, atol=1e-10)
    assert penalty.item() == pytest.approx(expected.mean().item(), rel=1e-7)
    assert total.item() == pytest.approx(fit.item() + 0.5 * expected.mean().item(), rel=1e-7)
    # detaching the teacher's input gives the student-only gradient: a different penalty
    xd = x.clone().requires_grad_(True)
    norms_detached = input_gradient_norm(_per_example(student, teacher, xd, through_teacher=False), xd, p=p)
    only = torch.linalg.vector_norm(g_student_only, ord=p, dim=1)
    assert torch.allclose(norms_detached, only, rtol=1e-7, atol=1e-10)
    assert (norms - norms_detached).abs().max() > 0.1 * norms.abs().max()


def test_the_two_input_gradients_differ_by_the_teacher_jacobian_term():
    """grad_x l = J_S^T dl/do_S + J_T^T dl/do_T: the second term is what detaching drops."""
    student, teacher, x = _nets()
    xi = x.clone().requires_grad_(True)
    zs, zt = student(xi), teacher(xi)
    per = _kd64(zs, zt)
    (g_both,) = torch.autograd.grad(per.sum(), xi, retain_graph=True)
    dl_dzt = torch.autograd.grad(per.sum(), zt, retain_graph=True)[0]
    (teacher_term,) = torch.autograd.grad(zt, xi, grad_outputs=dl_dzt, retain_graph=True)
    (student_term,) = torch.autograd.grad(zs, xi, grad_outputs=torch.autograd.grad(per.sum(), zs)[0])
    assert torch.allclose(g_both, student_term + teacher_term, atol=1e-12)
    assert teacher_term.norm() > 0.1 * g_both.norm()


def test_penalty_trains_the_student_by_double_backprop_through_the_teacher_path():
    student, teacher, x = _nets()
    names = [n for n, _ in student.named_parameters()]
    params = {n: p.detach().clone() for n, p in student.named_parameters()}

    def penalty(ps: dict) -> torch.Tensor:
        xi = x.clone().requires_grad_(True)
        per = _kd64(functional_call(student, ps, (xi,)), teacher(xi))
        return wasserstein_kd_loss(per, xi, eps=1.0)[2]

    leaves = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    grads = dict(zip(names, torch.autograd.grad(penalty(leaves), list(leaves.values()))))
    h = 1e-6
    checked = 0
    for name in ("0.weight", "2.weight", "0.bias"):
        for idx in [(0, 0), (1, 2), (2, 3)] if params[name].dim() == 2 else [(0,), (4,)]:
            plus = {n: v.clone() for n, v in params.items()}
            minus = {n: v.clone() for n, v in params.items()}
            plus[name][idx] += h
            minus[name][idx] -= h
            fd = (penalty(plus) - penalty(minus)).item() / (2 * h)
            assert grads[name][idx].item() == pytest.approx(fd, rel=1e-6, abs=1e-9), (name, idx)
            checked += 1
    assert checked == 8
    assert all(g.abs().sum() > 0 for g in grads.values())

    # the same derivative with the teacher's path cut is different (it is another penalty)
    def penalty_detached(ps):
        xi = x.clone().requires_grad_(True)
        per = _kd64(functional_call(student, ps, (xi,)), teacher(xi.detach()))
        return wasserstein_kd_loss(per, xi, eps=1.0)[2]

    leaves_d = {n: v.clone().requires_grad_(True) for n, v in params.items()}
    grads_d = torch.autograd.grad(penalty_detached(leaves_d), list(leaves_d.values()))
    diff = max((a - b).abs().max().item() for a, b in zip(grads.values(), grads_d))
    assert diff > 1e-2 * max(g.abs().max().item() for g in grads.values())


def test_backward_of_the_objective_reaches_the_student_only():
    student, teacher, x = _nets()
    xi = x.clone().requires_grad_(True)
    per = _per_example(student, teacher, xi)
    total, _, _ = wasserstein_kd_loss(per, xi, eps=0.7)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_loss_keeps_the_teacher_graph_only_when_asked():
    torch.manual_seed(1)
    zs = torch.randn(5, 4, requires_grad=True)
    zt = torch.randn(5, 4, requires_grad=True)
    loss_d = kd_loss(zs, zt, TEMP, reduction="none")  # default: the teacher is a constant target
    (g_s_default,) = torch.autograd.grad(loss_d.sum(), zs, retain_graph=True)
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(loss_d.sum(), zt)
    per = kd_loss(zs, zt, TEMP, reduction="none", detach_teacher=False)
    assert torch.allclose(per, loss_d)  # same value
    g_s, g_t = torch.autograd.grad(per.sum(), (zs, zt))
    assert torch.allclose(g_s, g_s_default)
    # d/dz_t of T^2 KL(p_t || p_s) = T p_t (log p_t - log p_s - KL), derived by hand
    p_t = F.softmax(zt.detach() / TEMP, -1)
    a = F.log_softmax(zt.detach() / TEMP, -1) - F.log_softmax(zs.detach() / TEMP, -1)
    kl = (p_t * a).sum(-1, keepdim=True)
    assert torch.allclose(g_t, TEMP * p_t * (a - kl), atol=1e-6)
    # and it equals the float64 loss used above
    assert torch.allclose(per.double(), _kd64(zs.detach().double(), zt.detach().double()), atol=1e-6)
