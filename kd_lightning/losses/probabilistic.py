"""Probabilistic knowledge transfer (PKT).

Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer",
ECCV 2018 (arXiv:1803.10837).

The student's embedding of a batch should induce the same conditional probabilities
:math:`p_{j|i}` (how likely example ``j`` is to be picked as a neighbour of example ``i``) as the
teacher's, so the two embeddings may have different widths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses._checks import check_positive, check_same_batch, upcast

__all__ = ["pkt_conditional_probabilities", "pkt_loss"]


def pkt_conditional_probabilities(embedding: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Conditional probabilities of PKT (Passalis & Tefas, ECCV 2018).

    .. math::
        K(a, b) = \frac12 \Big( \frac{a^\top b}{\|a\|_2 \|b\|_2} + 1 \Big), \qquad
        p_{j|i} = \frac{K(x_i, x_j)}{\sum_{k} K(x_i, x_k)}

    The cosine-similarity kernel, shifted to ``[0, 1]``, normalised per row. As in the authors'
    code: each row is divided by ``norm + eps`` (so an all-zero embedding maps to zero and has
    kernel value 1/2 with every example), and the sum in the denominator includes ``k = i`` (the
    paper's definition excludes it).

    Args:
        embedding: ``[B, ...]`` (flattened to ``[B, D]``).
        eps: added to the norms (authors' value ``1e-7``).

    Returns:
        ``[B, B]``, rows summing to 1.
    """
    check_positive("pkt eps", eps)
    x = upcast(embedding).reshape(embedding.shape[0], -1)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = 1e-7) -> Tensor:
    r"""PKT loss (Passalis & Tefas, ECCV 2018): KL(teacher || student) of the
    conditional probabilities, without its weight.

    .. math::
        L_{PKT} = \frac{1}{B^2} \sum_{i=1}^{B} \sum_{j=1}^{B}
                  p_{j|i} \log \frac{p_{j|i} + \epsilon}{q_{j|i} + \epsilon}

    with :math:`p` the teacher's and :math:`q` the student's probabilities
    (:func:`pkt_conditional_probabilities`). Following the authors' code (which the CRD
    benchmark's weight was tuned on): ``eps`` is added inside the logarithm, the diagonal
    ``j = i`` is included, and the double sum is averaged over all :math:`B^2` entries -- the
    paper's KL summed over ``j`` and averaged over ``i`` would be ``B`` times larger. The loss is
    0 when the student's embedding equals the teacher's, and (up to ``eps``) unchanged by a
    positive rescaling of any example's embedding.

    The total objective is :math:`L_{CE} + w\,L_{PKT}` on the penultimate embeddings; the
    CRD benchmark uses :math:`w = 30000` on CIFAR-100 (the paper has no CIFAR-100 run).

    Args:
        student: ``[B, ...]`` student embedding (flattened to ``[B, D_s]``).
        teacher: ``[B, ...]`` teacher embedding (``[B, D_t]``, any width; a constant).
        eps: ``1e-7`` as in the authors' code.
    """
    check_same_batch("pkt_loss", student, teacher)
    q = pkt_conditional_probabilities(student, eps)
    p = pkt_conditional_probabilities(teacher.detach(), eps)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return (p * torch.log((p + eps) / (q + eps))).mean()
