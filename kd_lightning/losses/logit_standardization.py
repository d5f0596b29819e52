r"""Logit standardisation for KD (Z-score pre-processing of the logits).

Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024
(arXiv:2403.01427).

Sharing one temperature between teacher and student makes KD push the student's logits to the
teacher's, up to a constant shift per example, and to the same standard deviation. Both are
unnecessary -- the ranking of the logits is what the student needs -- and hard for a small
student. Standardising each logit vector (zero mean, unit standard deviation) before the
temperature softmax removes both constraints: equivalently, each network gets its own
per-example temperature proportional to the standard deviation of its logits.
"""

from __future__ import annotations

from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.losses._checks import check_logits, check_positive, check_reduction, upcast
from kd_lightning.losses.response import kd_loss

__all__ = ["standardize_logits", "standardized_kd_loss"]


def standardize_logits(logits: Tensor, correction: int = 0, eps: float = 1e-7) -> Tensor:
    r"""Z-score of each logit vector (Sun et al., CVPR 2024, Algorithm 1 without the base
    temperature).

    .. math::
        \mathcal{Z}(z) = \frac{z - \bar z}{\sigma(z) + \epsilon}, \qquad
        \bar z = \frac1K \sum_k z_k, \quad
        \sigma(z) = \sqrt{\frac{1}{K - \delta} \sum_k (z_k - \bar z)^2}

    over the last dimension (the ``K`` classes). The result has zero mean and (for
    ``correction = 0``) unit standard deviation and values in :math:`[-\sqrt{K-1}, \sqrt{K-1}]`,
    keeps the ranking of the logits, and is invariant to :math:`z \mapsto a z + c` for any
    :math:`a > 0` (up to ``eps``). A constant vector maps to zeros.

    Args:
        logits: ``[..., K]``.
        correction: :math:`\delta`; 0 is the paper's Algorithm 1 (population standard
            deviation), 1 is the authors' code (``torch.std``'s default, Bessel's correction),
            which only rescales the result by :math:`\sqrt{(K-1)/K}` -- the same as a base
            temperature larger by :math:`\sqrt{K/(K-1)}` (0.5 % for 100 classes).
        eps: added to :math:`\sigma` (authors' code: ``1e-7``).
    """
    if correction not in (0, 1):
        raise KDConfigError(f"correction must be 0 (population standard deviation, as in the paper) "
                            f"or 1 (Bessel's correction, as in the authors' code); got {correction!r}.")
    check_positive("logit standardisation eps", eps)
    z = upcast(logits)
    if correction == 1 and z.shape[-1] < 2:
        raise KDConfigError("Bessel's correction needs at least 2 logits per example.")
    mean = z.mean(dim=-1, keepdim=True)
    std = z.std(dim=-1, keepdim=True, correction=correction)
    return (z - mean) / (std + eps)


def standardized_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0,
                         reduction: str = "batchmean", correction: int = 0,
                         eps: float = 1e-7) -> Tensor:
    r"""KD on standardised logits (Sun et al., CVPR 2024, Algorithm 2).

    .. math::
        L = \tau^2\, \mathrm{KL}\Big(\mathrm{softmax}\big(\mathcal{Z}(v) / \tau\big) \,\Big\|\,
                                   \mathrm{softmax}\big(\mathcal{Z}(z) / \tau\big)\Big)

    i.e. :func:`kd_lightning.losses.kd_loss` applied to :func:`standardize_logits` of both the
    student logits :math:`z` and the teacher logits :math:`v`, with the base temperature
    :math:`\tau` shared by both (KL summed over classes, averaged over the batch). The paper's
    objective is :math:`\lambda_{CE} L_{CE}(y, \mathrm{softmax}(z)) + \lambda_{KD} L`: the
    cross-entropy sees the raw logits. Authors' CIFAR-100 setting: :math:`\tau = 2` (3 for a few
    teacher/student pairs), :math:`\lambda_{CE} = 1`, :math:`\lambda_{KD} = 9` -- a KD weight much
    larger than usual, which the paper motivates by the smaller gradients through the Z-score.
    The same pre-processing applies to other logit losses (the paper also uses it with DKD):
    standardise both logit tensors and pass them on.

    Args:
        student_logits: ``[B, K]``.
        teacher_logits: ``[B, K]`` (a constant).
        temperature: base temperature :math:`\tau > 0`.
        reduction: ``"batchmean"`` or ``"none"`` (per example).
        correction, eps: see :func:`standardize_logits`.
    """
    check_logits("standardized_kd_loss", student_logits, teacher_logits)
    check_positive("base temperature", temperature, "(the paper uses 2)")
    check_reduction(reduction)
    z_s = standardize_logits(student_logits, correction, eps)
    z_t = standardize_logits(teacher_logits.detach(), correction, eps)
    return kd_loss(z_s, z_t, temperature, reduction=reduction)
