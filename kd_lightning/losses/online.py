"""Online distillation: peers trained together, each distilling from the others.

Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kd_lightning.losses.labels import labelled_cross_entropy
from kd_lightning.losses.response import kd_loss


def deep_mutual_learning_loss(logits: Tensor, peer_logits: Sequence[Tensor], targets: Tensor,
                              temperature: float = 1.0, ce_weight: float = 1.0,
                              kd_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    r"""The loss of peer :math:`k` in deep mutual learning (Zhang et al. 2018, Eq. 10).

    .. math::
        L_{\Theta_k} = w_{ce}\, L_{C_k}
            + w_{kd}\, \frac{1}{K-1} \sum_{l \neq k} T^2\, D_{KL}(p_l \,\|\, p_k),
        \qquad D_{KL}(p_l \| p_k) = \sum_m p_l^m \log \frac{p_l^m}{p_k^m}

    :math:`L_{C_k}` is the cross-entropy of peer :math:`k` with the labels, :math:`p_l` the
    (tempered) softmax of peer :math:`l`. The other peers' predictions are constants (detached):
    the gradient reaches peer :math:`k` only. The paper uses :math:`T = 1` and unit weights
    (:math:`K = 2` gives its Eq. 1/2: :math:`L_{C_1} + D_{KL}(p_2 \| p_1)`); with :math:`T \neq 1`
    the KL term is scaled by :math:`T^2` as in Hinton et al. (2015). The KL divergence is summed
    over classes and averaged over the batch.

    Args:
        logits: ``[B, C]`` logits of peer :math:`k`.
        peer_logits: the ``K - 1 >= 1`` other peers' ``[B, C]`` logits.
        targets: ``[B]`` class labels, ``UNLABELLED`` (-1) for a transfer example, which the
            cross-entropy skips (or a mixed batch's
            :class:`~kd_lightning.losses.labels.MixedTargets`: ``lam CE(a) + (1 - lam) CE(b)``).
        temperature: ``T > 0`` of the softmax in the KL term.
        ce_weight, kd_weight: :math:`w_{ce}`, :math:`w_{kd}`.

    Returns:
        ``(total, ce, kl)``: the weighted total, and the unweighted cross-entropy and mean KL term.
    """
    if len(peer_logits) < 1:
        raise ValueError("deep mutual learning needs at least one other peer's logits")
    ce = labelled_cross_entropy(logits, targets)
    kl = sum(kd_loss(logits, other, temperature) for other in peer_logits) / len(peer_logits)
    return ce_weight * ce + kd_weight * kl, ce, kl
