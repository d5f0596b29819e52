r"""Overhaul of feature distillation (OFD): margin ReLU target and partial L2 distance.

Reference:
    Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation",
    ICCV 2019 (arXiv:1904.01866).

OFD distils the teacher's *pre-ReLU* features at the end of each stage. The student's feature
(also pre-ReLU) goes through a connector -- a 1x1 convolution + batch norm, which is
:class:`kd_lightning.models.connectors.ConvConnector` (same layers and initialisation as the
authors') -- and is compared with the teacher's feature after a *margin ReLU*
:math:`\sigma_m(t) = \max(t, m)`: negative teacher responses carry little information beyond
"inactive", so they are all raised to the margin :math:`m`, the expected value of the channel's
negative responses (:func:`ofd_margin`). The distance is a *partial* L2 (:func:`ofd_partial_l2`)
that ignores a student response already below a non-positive target.

CIFAR-100 setting of the paper (its code): features at the end of every residual stage, stage
``i`` of ``n`` weighted by :math:`1 / 2^{n-1-i}` (the deepest stage 1, halving towards the input;
:func:`ofd_loss`), the sum of squared errors divided by the batch size, and the distillation
weight :math:`\alpha = 10^{-3}` next to the cross entropy (ImageNet: :math:`10^{-4}`).
Computed in float32; teacher tensors are detached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.losses.feature import pool_to_smaller

__all__ = ["ofd_margin", "ofd_margin_from_bn", "ofd_partial_l2", "ofd_loss", "ofd_stage_weights"]


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor, min_mass: float = 1e-3) -> Tensor:
    r"""Per-channel margin of OFD: the expected value of the negative responses.

    The pre-ReLU response of channel :math:`c` after batch norm is modelled as
    :math:`x \sim \mathcal{N}(\beta_c, \gamma_c^2)` (the BN shift and scale, which are the
    response's mean and standard deviation over the training data), and

    .. math:: m_c = \mathbb{E}[x \mid x < 0]
              = \beta_c - |\gamma_c| \, \frac{\varphi(\beta_c / |\gamma_c|)}
                                              {\Phi(-\beta_c / |\gamma_c|)}

    with :math:`\varphi, \Phi` the standard normal density and distribution function. Where the
    negative mass :math:`\Phi(-\beta_c / |\gamma_c|)` is at most ``min_mass`` (``1e-3`` in the
    authors' code) the formula is numerically meaningless and :math:`m_c = -3|\gamma_c|` is used,
    as in the authors' code; a channel with :math:`\gamma_c = 0` (a constant response
    :math:`\beta_c`) gets :math:`\min(\beta_c, 0)`. Computed in float64, returned as float32
    ``[C]`` (always :math:`\le 0`).

    Args:
        bn_weight: :math:`\gamma`, ``[C]``, of the teacher's batch norm before the ReLU.
        bn_bias: :math:`\beta`, ``[C]``.
        min_mass: the negative-mass threshold.
    """
    gamma = bn_weight.detach().double().flatten()
    beta = bn_bias.detach().double().flatten()
    if gamma.shape != beta.shape:
        raise KDConfigError(f"ofd_margin: BN weight {tuple(bn_weight.shape)} and bias "
                            f"{tuple(bn_bias.shape)} must have one entry per channel each.")
    if not 0 < min_mass < 1:
        raise KDConfigError(f"ofd_margin: min_mass must be in (0, 1) (the authors use 1e-3), got "
                            f"{min_mass}.")
    s = gamma.abs()
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    z = beta / safe_s
    mass = 0.5 * torch.erfc(z / math.sqrt(2.0))  # Phi(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    gaussian = beta - safe_s * pdf / torch.clamp(mass, min=torch.finfo(torch.float64).tiny)
    margin = torch.where(mass > min_mass, gaussian, -3.0 * s)
    margin = torch.where(s > 0, margin, torch.clamp(beta, max=0.0))
    return margin.float().to(bn_weight.device)


def ofd_margin_from_bn(bn: nn.Module) -> Tensor:
    """:func:`ofd_margin` from a batch-norm module (``weight`` and ``bias`` must exist)."""
    weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
    if weight is None or bias is None:
        raise KDConfigError(f"ofd_margin_from_bn: {type(bn).__name__} has no affine weight and "
                            f"bias; OFD needs the teacher's batch norm before the ReLU (affine=True).")
    return ofd_margin(weight, bias)


def ofd_partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    r"""OFD distance for one stage: partial L2 to the margin-ReLU teacher, summed, per example.

    .. math:: T = \max(t, m), \qquad
              d_p(T, S) = \begin{cases} 0 & S \le T \le 0 \\ (T - S)^2 & \text{otherwise}
              \end{cases}, \qquad
              L = \frac{1}{B} \sum_{b, c, p} d_p(T_{b,c,p}, S_{b,c,p})

    with :math:`t` the teacher's pre-ReLU feature, :math:`m` the per-channel margin
    (:func:`ofd_margin`) and :math:`S` the connector's output. Where the target is non-positive
    (the teacher neuron is inactive) a student response below it is not penalised; everywhere
    else the squared error is. Summed over channels and positions, divided by the batch size, as
    in the authors' code.

    Args:
        student: ``[B, C, ...]`` connector output (pre-ReLU student feature mapped to ``C``).
        teacher: ``[B, C, ...]`` teacher pre-ReLU feature (a constant). If the spatial sizes
            differ, the larger map is average-pooled to the smaller one (before the margin).
        margin: ``[C]``.
    """
    s, t = student.float(), teacher.detach().float()
    if s.dim() in (3, 4) and t.dim() == s.dim():
        s, t = pool_to_smaller(s, t)
    if s.shape != t.shape or s.dim() < 2:
        raise KDConfigError(f"ofd_partial_l2: student {tuple(student.shape)} and teacher "
                            f"{tuple(teacher.shape)} features do not match; map the student's "
                            f"feature through a 1x1 conv + BN connector to the teacher's channels.")
    m = margin.detach().float().to(s.device).flatten()
    if m.numel() != s.shape[1]:
        raise KDConfigError(f"ofd_partial_l2: {m.numel()} margins for {s.shape[1]} channels; "
                            f"compute them from the BN before the tapped teacher ReLU.")
    target = torch.maximum(t, m.view(1, -1, *([1] * (s.dim() - 2))))
    mask = (s > target) | (target > 0)
    return ((s - target).pow(2) * mask).sum() / s.shape[0]


def ofd_stage_weights(num_stages: int) -> list[float]:
    r"""The authors' stage weights :math:`1 / 2^{n-1-i}`, ``i = 0..n-1`` (shallow to deep)."""
    if int(num_stages) < 1:
        raise KDConfigError(f"ofd_stage_weights: num_stages must be >= 1, got {num_stages}.")
    n = int(num_stages)
    return [1.0 / 2 ** (n - 1 - i) for i in range(n)]


def ofd_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor],
             margins: Sequence[Tensor], stage_weights: Sequence[float] | None = None) -> Tensor:
    r"""OFD distillation loss over the stages (without the weight :math:`\alpha`).

    .. math:: L_{OFD} = \sum_{i=0}^{n-1} w_i \, L_{partial}(S_i, t_i, m_i), \qquad
              w_i = 1 / 2^{n-1-i}

    (:func:`ofd_partial_l2` per stage; default weights :func:`ofd_stage_weights`, the authors'
    code). The caller adds :math:`\alpha L_{OFD}` to the cross entropy, :math:`\alpha = 10^{-3}`
    on CIFAR-100.

    Args:
        student_feats: connector outputs, shallow to deep.
        teacher_feats: teacher pre-ReLU features, same order.
        margins: one ``[C_i]`` margin per stage.
        stage_weights: :math:`w_i` (default: the authors').
    """
    n = len(student_feats)
    if n == 0 or len(teacher_feats) != n or len(margins) != n:
        raise KDConfigError(f"ofd_loss: need one teacher feature and one margin per student "
                            f"feature (at least one), got {n} student features, "
                            f"{len(teacher_feats)} teacher features and {len(margins)} margins.")
    weights = ofd_stage_weights(n) if stage_weights is None else list(stage_weights)
    if len(weights) != n:
        raise KDConfigError(f"ofd_loss: {len(weights)} stage weights for {n} stages.")
    total = None
    for w, s, t, m in zip(weights, student_feats, teacher_feats, margins):
        term = w * ofd_partial_l2(s, t, m)
        total = term if total is None else total + term
    return total
