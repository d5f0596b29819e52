"""Logit matching: Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014."""

from __future__ import annotations

from torch import Tensor


def logit_matching_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    r"""Logit regression of Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014.

    .. math:: L = \frac{1}{2B} \sum_b \| z_s^{(b)} - z_t^{(b)} \|_2^2

    The student regresses the teacher's logits (before the softmax) with an L2 loss: the
    :math:`T \to \infty` limit of Hinton et al.'s soft-target gradient, up to a factor
    (Hinton et al. 2015, section 2.1).
    """
    diff = student_logits.float() - teacher_logits.detach().float()
    return 0.5 * diff.pow(2).sum(-1).mean()
