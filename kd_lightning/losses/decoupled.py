r"""Decoupled knowledge distillation (DKD).

Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).

The classical KD loss splits exactly into a target-class term and a non-target-class term,

.. math::
    \mathrm{KD} = \mathrm{TCKD} + (1 - p_t^{T})\, \mathrm{NCKD},

where :math:`p_t^{T}` is the teacher's (temperature-softened) probability of the true class. The
factor :math:`1 - p_t^{T}` suppresses NCKD exactly on the examples the teacher is confident about;
DKD drops it and weights the two terms independently: :math:`\alpha\,\mathrm{TCKD} + \beta\,
\mathrm{NCKD}`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.losses._checks import (
    check_logits,
    check_non_negative,
    check_positive,
    check_reduction,
    upcast,
)

__all__ = ["dkd_terms", "dkd_loss", "dkd_warmup_weight"]


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    return per_example if reduction == "none" else per_example.mean()


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
              temperature: float = 4.0, reduction: str = "batchmean") -> tuple[Tensor, Tensor]:
    r"""The two DKD terms, TCKD and NCKD (Zhao et al., CVPR 2022), each scaled by :math:`T^2`.

    With :math:`p = \mathrm{softmax}(z / T)` and ``t`` the true class,

    .. math::
        b = [\,p_t,\; 1 - p_t\,], \qquad
        \hat p_i = \frac{\exp(z_i / T)}{\sum_{j \ne t} \exp(z_j / T)} \quad (i \ne t),

    .. math::
        \mathrm{TCKD} = T^2\, \mathrm{KL}(b^{T} \,\|\, b^{S}), \qquad
        \mathrm{NCKD} = T^2\, \mathrm{KL}(\hat p^{T} \,\|\, \hat p^{S}),

    summed over the two bins / the ``K - 1`` non-target classes and averaged over the batch
    (``batchmean``), as in the authors' code. Computed in log space: :math:`\log b_t` and
    :math:`\log(1 - p_t)` come from log-sum-exps over all / the non-target logits (the authors'
    code takes the log of summed probabilities, which underflows for confident predictions), and
    NCKD drops the target column exactly (the authors' code subtracts 1000 from the target logit).

    TCKD depends on the student logits only through :math:`p^S_t`: its gradient is
    :math:`T (p^S_t - p^T_t)` on the target logit and :math:`-T (p^S_t - p^T_t)\, \hat p^S_i` on
    each other logit. NCKD does not depend on the target logit; its gradient is
    :math:`T (\hat p^S_i - \hat p^T_i)` on the others (per example, before averaging).

    Args:
        student_logits: ``[B, K]``, ``K >= 2``.
        teacher_logits: ``[B, K]`` (a constant).
        targets: ``[B]`` class indices.
        temperature: ``T > 0`` (paper: 4 on CIFAR-100).
        reduction: ``"batchmean"`` (scalars) or ``"none"`` (per-example ``[B]`` tensors).

    Returns:
        ``(tckd, nckd)``.
    """
    check_logits("DKD", student_logits, teacher_logits)
    check_positive("DKD temperature", temperature)
    check_reduction(reduction)
    b, k = student_logits.shape
    if k < 2:
        raise KDConfigError(f"DKD needs at least 2 classes (it splits the target class from the "
                            f"others); got logits with {k} column.")
    if targets.shape != (b,) or targets.dtype in (torch.bool,) or targets.is_floating_point():
        raise KDConfigError(f"DKD targets must be class indices of shape [{b}] (integer dtype); got "
                            f"shape {tuple(targets.shape)} and dtype {targets.dtype}.")
    z_s = upcast(student_logits) / temperature
    z_t = upcast(teacher_logits.detach()) / temperature
    gt = F.one_hot(targets.long(), k).bool()
    with torch.autocast(device_type=z_s.device.type, enabled=False):
        z_s_nt = z_s[~gt].view(b, k - 1)
        z_t_nt = z_t[~gt].view(b, k - 1)

        def log_binary(z: Tensor, z_nt: Tensor) -> Tensor:
            lse = torch.logsumexp(z, dim=1)
            log_pt = z[gt] - lse
            log_not_pt = torch.logsumexp(z_nt, dim=1) - lse
            return torch.stack([log_pt, log_not_pt], dim=1)  # [B, 2]

        log_b_s, log_b_t = log_binary(z_s, z_s_nt), log_binary(z_t, z_t_nt)
        tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=1)
        log_q_s, log_q_t = F.log_softmax(z_s_nt, dim=1), F.log_softmax(z_t_nt, dim=1)
        nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(dim=1)
    scale = temperature**2
    return _reduce(tckd * scale, reduction), _reduce(nckd * scale, reduction)


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0, reduction: str = "batchmean") -> Tensor:
    r"""DKD loss (Zhao et al., CVPR 2022): :math:`\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}`
    (:func:`dkd_terms`, both with :math:`T^2`).

    The full objective is :math:`L_{CE} + w(e)\,(\alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD})`
    with the warm-up weight :math:`w(e)` of :func:`dkd_warmup_weight`. Paper / authors' code
    defaults on CIFAR-100: CE weight 1, :math:`\alpha = 1`, :math:`T = 4`, 20 warm-up epochs, and
    :math:`\beta` set per teacher: 8 for ResNet32x4 (the default here), 6 for WRN-40-2 and VGG13,
    2 for ResNet56 / ResNet110. With :math:`\alpha = 1` and :math:`\beta = 1 - p^T_t` (per
    example) it is exactly the classical KD loss.

    Args:
        alpha: TCKD weight (>= 0).
        beta: NCKD weight (>= 0).
        temperature, reduction: as in :func:`dkd_terms`.
    """
    check_non_negative("DKD alpha", alpha, "(it weights the target-class term TCKD)")
    check_non_negative("DKD beta", beta, "(it weights the non-target-class term NCKD)")
    tckd, nckd = dkd_terms(student_logits, teacher_logits, targets, temperature, reduction)
    return alpha * tckd + beta * nckd


def dkd_warmup_weight(epoch: float, warmup_epochs: float = 20) -> float:
    r"""Linear warm-up of the DKD term (authors' code): :math:`w = \min\big((e + 1) / E_w,\ 1\big)`.

    ``epoch`` is 0-based (Lightning's ``current_epoch``; a fraction such as
    ``current_epoch + batch_idx / num_batches`` ramps per step). The authors count epochs from 1
    and use :math:`\min(e_1 / E_w, 1)`, so the first epoch trains with weight :math:`1 / E_w` and the
    full weight is reached at the :math:`E_w`-th epoch; ``epoch + 1`` reproduces that. Paper:
    :math:`E_w = 20` on CIFAR-100; ``warmup_epochs = 0`` disables the warm-up.
    """
    check_non_negative("DKD warmup_epochs", warmup_epochs)
    check_non_negative("epoch", epoch, "(pass the 0-based current epoch)")
    if warmup_epochs == 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)
