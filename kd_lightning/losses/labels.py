r"""Label terms on batches that mix labelled and unlabelled examples.

A training batch is ``(x, y, index)``; an unlabelled example (transfer data without a label, see
``DistillDataModule(unlabelled=...)``) carries ``y = UNLABELLED`` (-1). Label terms average over
the labelled rows of the batch only, and are exactly 0 -- with zero gradient -- when the batch
has none; distillation terms (which need no label) use every row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: the label of an unlabelled training example
UNLABELLED = -1


def labelled_mask(targets: Tensor) -> Tensor:
    """``[B]`` bool: which rows carry a label (``targets != UNLABELLED``)."""
    return targets != UNLABELLED


def labelled_mean(per_example: Tensor, targets: Tensor) -> Tensor:
    r"""Mean of a per-example label term over the labelled rows only.

    .. math:: \frac{1}{\max(1, |L|)} \sum_{i \in L} \ell_i, \qquad L = \{i : y_i \ne -1\}

    Unlabelled rows are masked with ``where`` (not multiplied), so a non-finite value there can
    neither reach the result nor its gradient; a batch without labelled rows gives 0.
    """
    mask = labelled_mask(targets)
    total = per_example.float().where(mask, per_example.new_zeros(()).float()).sum()
    return total / mask.sum().clamp_min(1)


def _where_labelled(mean: Tensor, targets: Tensor) -> Tensor:
    """A mean over the labelled rows from a reduction that ignores ``UNLABELLED``; 0 (not the
    0/0 nan, and with zero gradient) when no row is labelled. No host synchronisation."""
    return torch.where(labelled_mask(targets).any(), mean, mean.new_zeros(()))


def labelled_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Cross-entropy with the labels, averaged over the labelled rows of the batch:

    .. math:: CE = -\frac{1}{|L|} \sum_{i \in L} \log \mathrm{softmax}(z_i)_{y_i}

    Bit for bit ``F.cross_entropy(logits, targets)`` when every row is labelled (it is that call,
    with ``ignore_index=UNLABELLED``); rows with ``targets == UNLABELLED`` get exactly zero loss
    and zero gradient; 0 when no row is labelled. Computed in float32.
    """
    return _where_labelled(F.cross_entropy(logits.float(), targets, ignore_index=UNLABELLED),
                           targets)


def labelled_nll(log_probs: Tensor, targets: Tensor) -> Tensor:
    """``F.nll_loss`` averaged over the labelled rows (0 when there are none)."""
    return _where_labelled(F.nll_loss(log_probs, targets, ignore_index=UNLABELLED), targets)


__all__ = ["UNLABELLED", "labelled_cross_entropy", "labelled_mask", "labelled_mean", "labelled_nll"]
