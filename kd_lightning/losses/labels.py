r"""Label terms on batches that mix labelled and unlabelled examples.

A training batch is ``(x, y, index)``; an unlabelled example (transfer data without a label, see
``DistillDataModule(unlabelled=...)``) carries ``y = UNLABELLED`` (-1). Label terms average over
the labelled rows of the batch only, and are exactly 0 -- with zero gradient -- when the batch
has none; distillation terms (which need no label) use every row.
"""

from __future__ import annotations

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


def labelled_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Cross-entropy with the labels, averaged over the labelled rows of the batch:

    .. math:: CE = -\frac{1}{\max(1, |L|)} \sum_{i \in L} \log \mathrm{softmax}(z_i)_{y_i}

    Equal to ``F.cross_entropy(logits, targets)`` when every row is labelled; rows with
    ``targets == UNLABELLED`` get exactly zero loss and zero gradient; 0 (not nan) when no row is
    labelled. Computed in float32.
    """
    per_example = F.cross_entropy(logits.float(), targets, ignore_index=UNLABELLED,
                                  reduction="none")
    return labelled_mean(per_example, targets)


__all__ = ["UNLABELLED", "labelled_cross_entropy", "labelled_mask", "labelled_mean"]
