"""Similarity-preserving knowledge distillation (SP).

Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682).

The student matches, for a batch of ``b`` examples, the teacher's ``b x b`` matrix of pairwise
activation similarities -- not the activations themselves -- so the two networks' layers may have
any widths and spatial sizes; only the batch must be the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.losses._checks import as_list, check_pairs, check_same_batch, upcast

__all__ = ["similarity_matrix", "sp_loss"]


def similarity_matrix(feature: Tensor) -> Tensor:
    r"""Row-normalised batch similarity matrix of Tung & Mori (ICCV 2019).

    .. math::
        \tilde G = Q\, Q^\top, \qquad G_{[i,:]} = \tilde G_{[i,:]} / \|\tilde G_{[i,:]}\|_2

    with :math:`Q \in \mathbb{R}^{b \times chw}` the activation map of each example flattened
    to a row. Each row of :math:`\tilde G` is scaled to unit L2 norm (an all-zero row stays zero:
    the norm is clamped at ``1e-12``). Computed in float32 (float64 stays float64) with autocast
    off, as a bf16 Gram matrix would lose the small similarities.

    Args:
        feature: ``[b, ...]`` activations of one layer (any shape after the batch dimension).

    Returns:
        ``[b, b]``.
    """
    q = upcast(feature).reshape(feature.shape[0], -1)
    with torch.autocast(device_type=q.device.type, enabled=False):
        return F.normalize(q @ q.t(), p=2, dim=1)


def sp_loss(student_feats: Tensor | Sequence[Tensor],
            teacher_feats: Tensor | Sequence[Tensor]) -> Tensor:
    r"""Similarity-preserving loss of Tung & Mori (ICCV 2019), without its weight.

    .. math::
        L_{SP} = \frac{1}{b^2} \sum_{(l, l') \in \mathcal{I}}
                 \big\| G_T^{(l)} - G_S^{(l')} \big\|_F^2

    summed over the layer pairs :math:`\mathcal{I}` (``student_feats[k]`` against
    ``teacher_feats[k]``), with :math:`G` from :func:`similarity_matrix` and ``b`` the batch
    size. The squared Frobenius norm sums over all :math:`b^2` entries, so the :math:`1/b^2`
    makes it a mean over example pairs.

    The total objective is :math:`L_{CE} + \gamma L_{SP}`; the paper uses
    :math:`\gamma = 3000` (CIFAR-10, one pair: the last block of each network), the value the
    CRD benchmark also uses on CIFAR-100 (on the output of the last residual stage). Only the
    batch sizes of a pair must match: the widths and spatial sizes are free, because
    :math:`G` is ``b x b`` whatever the layer. The loss is invariant to any permutation of the
    features within a layer and to a positive rescaling of a layer's activations.

    Args:
        student_feats: one ``[b, ...]`` student activation, or a sequence (one per pair).
        teacher_feats: the matching teacher activations (treated as constants).
    """
    s_list, t_list = as_list(student_feats), as_list(teacher_feats)
    check_pairs("sp_loss", s_list, t_list)
    total = None
    for fs, ft in zip(s_list, t_list):
        check_same_batch("sp_loss", fs, ft)
        b = fs.shape[0]
        g_s = similarity_matrix(fs)
        g_t = similarity_matrix(ft.detach())
        term = (g_t - g_s).pow(2).sum() / (b * b)
        total = term if total is None else total + term
    return total
