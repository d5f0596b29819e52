"""Response-based (logit) distillation losses.

Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, 2015.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses.labels import labelled_cross_entropy


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
            reduction: str = "batchmean", detach_teacher: bool = True) -> Tensor:
    r"""Soft-target term of Hinton et al. (2015).

    .. math::
        L_{KD} = T^2 \; \mathrm{KL}\big(\mathrm{softmax}(z_t / T) \,\|\, \mathrm{softmax}(z_s / T)\big)

    The KL divergence is summed over classes and averaged over the batch (``batchmean``), and
    scaled by :math:`T^2` so that its gradient magnitude does not shrink as ``T`` grows
    (the gradient w.r.t. ``z_s`` is :math:`T (q_s - p_t)`, see Hinton et al., section 2).

    Args:
        student_logits: ``[B, K]`` student logits :math:`z_s`.
        teacher_logits: ``[B, K]`` teacher logits :math:`z_t`.
        temperature: ``T > 0``.
        reduction: ``"batchmean"`` (scalar) or ``"none"`` (per-example ``[B]``, used by
            the Wasserstein objective which needs a loss per example).
        detach_teacher: ``True`` (default): :math:`z_t` is a constant target, no gradient flows
            into it. ``False``: the loss stays differentiable in :math:`z_t`, for objectives that
            differentiate :math:`l(z_s(x), z_t(x))` w.r.t. the *input* :math:`x` through both
            networks -- the input-gradient penalty of Kong et al. (2020, eq. 2,
            :func:`~kd_lightning.losses.wasserstein_kd_loss`). The teacher stays untrained as long
            as its parameters do not require grad (freeze them); only its input-output path is
            kept.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    z_t = teacher_logits.detach() if detach_teacher else teacher_logits
    log_p_t = F.log_softmax(z_t.float() / temperature, dim=-1)
    # KL(p_t || p_s) = sum_k p_t (log p_t - log p_s)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    if reduction == "none":
        return kl * temperature**2
    if reduction == "batchmean":
        return kl.mean() * temperature**2
    raise ValueError(f"reduction must be 'batchmean' or 'none', got {reduction!r}")


def response_kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
                     temperature: float = 4.0, ce_weight: float = 0.1,
                     kd_weight: float = 0.9) -> tuple[Tensor, Tensor, Tensor]:
    r"""Hinton et al. (2015) objective: :math:`w_{ce}\,CE(y, z_s) + w_{kd}\,L_{KD}`.

    The paper's weighting is :math:`w_{ce} = 1 - \alpha`, :math:`w_{kd} = \alpha`; its MNIST
    experiment uses the soft targets alone (:math:`w_{ce} = 0`) or a small label weight.
    The cross-entropy averages over the labelled rows (``targets != -1``,
    :func:`~kd_lightning.losses.labelled_cross_entropy`), the soft term over every row.
    Returns ``(total, ce, kd)`` so a caller can log each term.
    """
    ce = labelled_cross_entropy(student_logits, targets)
    kd = kd_loss(student_logits, teacher_logits, temperature)
    return ce_weight * ce + kd_weight * kd, ce, kd


def response_terms(student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None,
                   temperature: float, ce_weight: float, kd_weight: float) -> dict[str, Tensor]:
    r"""The terms of :func:`response_kd_loss` by name, weighted: ``loss_ce`` =
    :math:`w_{ce}\,CE(y, z_s)` and, when ``teacher_logits`` is given, ``loss_kd`` =
    :math:`w_{kd}\,T^2\,\mathrm{KL}(\sigma(z_t/T) \| \sigma(z_s/T))`. The cross-entropy skips
    unlabelled rows (``targets == -1``); the soft term uses every row."""
    terms = {"loss_ce": ce_weight * labelled_cross_entropy(student_logits, targets)}
    if teacher_logits is not None:
        terms["loss_kd"] = kd_weight * kd_loss(student_logits, teacher_logits, temperature)
    return terms


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    r"""Cross-entropy against a soft target distribution, averaged over the batch.

    .. math:: \ell(q, p) = -\frac{1}{B} \sum_b \sum_k q_{bk} \log p_{bk}, \quad p = \mathrm{softmax}(z)

    Used by the student update of mutual distillation (Hu et al., 2016) where ``q`` is the
    rule-regularised teacher.
    """
    return -(target_probs.detach().float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


__all__ = ["kd_loss", "response_kd_loss", "response_terms", "soft_cross_entropy"]
