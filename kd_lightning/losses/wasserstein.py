"""Wasserstein-ball (distributionally robust) distillation for students that see few examples.

Kong et al. 2020, "Learning Student Network with Few Data" (the authors' slides).
With only ``N`` training examples, the empirical distribution :math:`\\mathbb{P}_N` is a poor
stand-in for the data-generating :math:`\\mathbb{P}`. Kong et al. minimise the worst-case
distillation risk over a Wasserstein ball :math:`\\mathcal{B}_\\epsilon(\\mathbb{P}_N)` around it,
whose upper bound (for a convex, lower-semicontinuous, Lipschitz loss) is

.. math::
    \\sup_{\\mathbb{Q} \\in \\mathcal{B}_\\epsilon(\\mathbb{P}_N)} \\mathbb{E}^{\\mathbb{Q}}[\\ell(x)]
    \\le \\frac{1}{N} \\sum_i \\ell(x_i) + \\epsilon \\sup_x \\|\\nabla_x \\ell(x)\\|,

and whose tractable proxy (their eq. 2) replaces the supremum by the mean over training examples:

.. math::
    L_W = \\frac{1}{N} \\sum_i l(o_i^S, o_i^T)
          + \\epsilon \\frac{1}{N} \\sum_i \\|\\nabla_{x_i} l(o_i^S, o_i^T)\\|.

Here :math:`o^S = \\mathcal{N}_S(x)` *and* :math:`o^T = \\mathcal{N}_T(x)`: the loss is
:math:`\\ell(x; \\mathcal{N}_S, \\mathcal{N}_T)` (their eq. 1), a function of the input through both
networks, so :math:`\\nabla_x l = J_S^\\top \\partial_{o^S} l + J_T^\\top \\partial_{o^T} l`. The
teacher's weights are frozen, but its input-output path is part of the gradient: compute the
teacher's outputs from the same ``inputs`` tensor, without ``no_grad`` or ``detach`` (e.g.
:func:`~kd_lightning.losses.kd_loss` with ``detach_teacher=False``), with the teacher's
parameters set to ``requires_grad=False``. Detaching the teacher's outputs gives the
student-only gradient :math:`J_S^\\top \\partial_{o^S} l` instead (a different penalty).

The input-gradient term is built with ``create_graph=True``: its derivative w.r.t. the student
parameters goes through the gradient itself (double backpropagation), so the penalty trains the
student to be flat around each training example -- Kong et al. read it as training on
noise-augmented data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["input_gradient_norm", "wasserstein_kd_loss"]


def _check_norm(p: float) -> None:
    if not (p >= 1 or math.isinf(p)):
        raise ValueError(f"the input-gradient norm order p must be >= 1 (or inf), got {p}")


def input_gradient_norm(loss_per_example: Tensor, inputs: Tensor, p: float = 2.0,
                        create_graph: bool = True) -> Tensor:
    r"""Per-example norms :math:`\|\nabla_{x_i} l_i\|_p`, shape ``[B]``.

    One backward pass of :math:`\sum_i l_i` w.r.t. ``inputs`` gives every :math:`\nabla_{x_i} l_i`
    at once, because :math:`l_i` depends on :math:`x_i` only. (With batch-coupled layers --
    BatchNorm in training mode -- :math:`l_j` also depends on :math:`x_i` through the batch
    statistics, and the row ``i`` is :math:`\nabla_{x_i} \sum_j l_j`, as in every batched
    implementation of input-gradient penalties.) The gradient is normed in float32 (float64
    stays float64), whatever the autocast precision of the forward pass.

    Args:
        loss_per_example: ``[B]`` losses :math:`l_i`, functions of ``inputs`` (through any number
            of networks: every path from ``inputs`` to the losses is differentiated).
        inputs: ``[B, ...]`` floating-point tensor with ``requires_grad=True``.
        p: order of the norm over each example's flattened gradient (2 = Euclidean).
        create_graph: keep the gradient differentiable (needed for the penalty to train the
            model); ``False`` gives a detached value for monitoring.
    """
    _check_norm(p)
    if not inputs.requires_grad:
        raise ValueError("inputs must require grad: call inputs.requires_grad_() before the "
                         "forward pass that produced loss_per_example")
    if loss_per_example.dim() != 1 or loss_per_example.shape[0] != inputs.shape[0]:
        raise ValueError(f"loss_per_example must be [B] with B = inputs.shape[0] = {inputs.shape[0]}, "
                         f"got shape {tuple(loss_per_example.shape)}")
    (grad,) = torch.autograd.grad(_upcast(loss_per_example).sum(), inputs,
                                  create_graph=create_graph, retain_graph=True, allow_unused=True,
                                  materialize_grads=True)
    return torch.linalg.vector_norm(_upcast(grad).flatten(1), ord=p, dim=1)


def _upcast(t: Tensor) -> Tensor:
    """float32 for half precision (autocast); float64 stays float64 (gradient checks)."""
    return t if t.dtype == torch.float64 else t.float()


def wasserstein_kd_loss(loss_per_example: Tensor, inputs: Tensor, eps: float,
                        p: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:
    r"""Kong et al.'s Wasserstein objective (Eq. 2).

    .. math::
        L_W = \frac{1}{N} \sum_i l(o_i^S, o_i^T)
              + \epsilon \frac{1}{N} \sum_i \|\nabla_{x_i} l(o_i^S, o_i^T)\|_p

    ``l`` is any per-example distillation loss; :class:`~kd_lightning.methods.WassersteinKD` uses
    the response-KD loss :math:`T^2 \mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T))`
    (:func:`~kd_lightning.losses.kd_loss` with ``reduction="none"``; ``detach_teacher=False``
    keeps the teacher's path from ``inputs``, as eq. 2 is written).

    On the norm: the bound holds with the *dual* of the norm that measures transport cost in
    the Wasserstein distance; ``p = 2`` (default) is its own dual, ``p = 1`` pairs with an
    :math:`\ell_\infty` transport cost and ``p = inf`` with :math:`\ell_1`.

    With ``eps = 0`` the penalty is not built into the graph (it would contribute exactly zero
    to every gradient); the returned gradient norm is then a detached value for monitoring.

    Args:
        loss_per_example: ``[B]`` losses :math:`l(o_i^S, o_i^T)`, computed from ``inputs`` (through
            the student, and through the teacher too for eq. 2 as written: see the module
            docstring).
        inputs: ``[B, ...]`` the examples :math:`x_i`, with ``requires_grad=True``.
        eps: radius :math:`\epsilon \ge 0` of the Wasserstein ball.
        p: order of the gradient norm (default 2).

    Returns:
        ``(L_W, mean_loss, mean_grad_norm)``.
    """
    if not eps >= 0:
        raise ValueError(f"eps (the Wasserstein radius) must be >= 0, got {eps}")
    fit = _upcast(loss_per_example).mean()
    norms = input_gradient_norm(loss_per_example, inputs, p, create_graph=eps > 0)
    grad_norm = norms.mean()
    if eps == 0:
        return fit, fit, grad_norm.detach()
    return fit + eps * grad_norm, fit, grad_norm
