r"""DIST: distillation from a stronger teacher with correlation-based relations.

Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(arXiv:2205.10536).

Exact matching of the teacher's probabilities (KL) is hard when the teacher is much stronger;
DIST only asks the student to preserve the teacher's *relations*: the Pearson correlation of the
predictions across classes for each example (inter-class) and across the examples of the batch
for each class (intra-class). Pearson correlation is invariant to a positive affine map of either
argument, so the student's probabilities need not match the teacher's in scale or offset.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses._checks import check_logits, check_non_negative, check_positive, upcast

__all__ = ["pearson_correlation", "dist_terms", "dist_loss"]


def pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Row-wise Pearson correlation of two ``[N, D]`` tensors (as in the authors' code).

    .. math::
        \rho(u, v) = \frac{(u - \bar u)^\top (v - \bar v)}
                          {\|u - \bar u\|_2 \, \|v - \bar v\|_2 + \epsilon}

    ``eps`` (``1e-8``) is added to the product of the norms, so a constant row has correlation 0.

    Returns:
        ``[N]``.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: Tensor, teacher_logits: Tensor,
               temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    r"""The inter- and intra-class relation terms of DIST (Huang et al., NeurIPS 2022), each
    scaled by :math:`\tau^2`.

    With :math:`Y = \mathrm{softmax}(Z / \tau)` row-wise (``[B, K]``),

    .. math::
        L_{inter} = \tau^2 \, \frac{1}{B} \sum_{i=1}^{B} \big(1 - \rho(Y^S_{i,:}, Y^T_{i,:})\big),
        \qquad
        L_{intra} = \tau^2 \, \frac{1}{K} \sum_{j=1}^{K} \big(1 - \rho(Y^S_{:,j}, Y^T_{:,j})\big)

    (:func:`pearson_correlation`), with the :math:`\tau^2` factor of the authors' code (as in
    KD, it keeps the gradient scale comparable across temperatures). The intra-class term needs
    ``B >= 2``: for a single example it is the constant 1.

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[B, K]`` (a constant).
        temperature: :math:`\tau > 0`.

    Returns:
        ``(inter, intra)`` scalars.
    """
    check_logits("DIST", student_logits, teacher_logits)
    check_positive("DIST temperature", temperature)
    y_s = (upcast(student_logits) / temperature).softmax(dim=1)
    y_t = (upcast(teacher_logits.detach()) / temperature).softmax(dim=1)
    with torch.autocast(device_type=y_s.device.type, enabled=False):
        inter = 1.0 - pearson_correlation(y_s, y_t).mean()
        intra = 1.0 - pearson_correlation(y_s.t(), y_t.t()).mean()
    scale = temperature**2
    return scale * inter, scale * intra


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0,
              gamma: float = 1.0, temperature: float = 1.0) -> Tensor:
    r"""DIST loss (Huang et al., NeurIPS 2022): :math:`\beta L_{inter} + \gamma L_{intra}`
    (:func:`dist_terms`).

    The full objective is :math:`\alpha L_{CE} + \beta L_{inter} + \gamma L_{intra}`. The
    defaults are those of the authors' released loss (``beta = gamma = 1``, ``tau = 1``, their
    ImageNet setting); for another setting (e.g. CIFAR-100, where KD baselines use ``T = 4``)
    choose ``temperature`` explicitly.

    Args:
        beta: inter-class weight (>= 0).
        gamma: intra-class weight (>= 0).
        temperature: :math:`\tau > 0`.
    """
    check_non_negative("DIST beta", beta, "(it weights the inter-class relation term)")
    check_non_negative("DIST gamma", gamma, "(it weights the intra-class relation term)")
    inter, intra = dist_terms(student_logits, teacher_logits, temperature)
    return beta * inter + gamma * intra
