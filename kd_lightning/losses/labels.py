r"""Label terms on batches that mix labelled and unlabelled examples.

A training batch is ``(x, y, index)``; an unlabelled example (transfer data without a label, see
``DistillDataModule(unlabelled=...)``) carries ``y = UNLABELLED`` (-1). Label terms average over
the labelled rows of the batch only, and are exactly 0 -- with zero gradient -- when the batch
has none; distillation terms (which need no label) use every row.

A MixUp/CutMix batch (``DistillDataModule(mixup=..., cutmix=...)``) carries
:class:`MixedTargets` instead of ``[B]`` labels: row ``i`` of the input mixes examples ``a_i``
and ``b_i`` with weight ``lam``, and a label term ``L(y)`` becomes ``lam L(a) + (1 - lam) L(b)``
(Zhang et al. 2018; Yun et al. 2019), each part skipping its own unlabelled rows.
:func:`labelled_cross_entropy` and :func:`labelled_nll` do this themselves; any other label term
goes through :func:`mixed`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: the label of an unlabelled training example
UNLABELLED = -1


class MixedTargets:
    """Targets of a mixed batch: row ``i`` is ``lam * x[a_i] + (1 - lam) * x[b_i]`` (MixUp) or
    ``x[a_i]`` with a box of ``x[b_i]`` covering ``1 - lam`` of it (CutMix).

    Attributes:
        a: ``[B]`` labels of the first examples (the batch's own rows; ``UNLABELLED`` allowed).
        b: ``[B]`` labels of the examples mixed in (``a[perm]``).
        lam: the weight of ``a``, a number in [0, 1] shared by the batch.
    """

    __slots__ = ("a", "b", "lam")

    def __init__(self, a: Tensor, b: Tensor, lam: float) -> None:
        self.a, self.b, self.lam = a, b, float(lam)

    def dominant(self) -> Tensor:
        """``[B]`` the label with the larger weight (``a`` on a tie): for accuracies."""
        return self.a if self.lam >= 0.5 else self.b

    def __repr__(self) -> str:
        return f"MixedTargets(a={self.a}, b={self.b}, lam={self.lam:.4f})"


def mixed(term, targets):
    r"""A label term under mixing: ``term(targets)`` for plain ``[B]`` labels, and

    .. math:: \lambda\, L(a) + (1 - \lambda)\, L(b)

    for :class:`MixedTargets` (elementwise over a tuple of terms). ``term`` maps ``[B]`` labels
    (with ``UNLABELLED`` rows) to a loss, e.g. ``lambda t: dkd_terms(z_s, z_t, t, T)``."""
    if not isinstance(targets, MixedTargets):
        return term(targets)
    lam = targets.lam
    first, second = term(targets.a), term(targets.b)
    if isinstance(first, tuple):
        return tuple(lam * u + (1.0 - lam) * v for u, v in zip(first, second))
    return lam * first + (1.0 - lam) * second


def target_classes(targets) -> Tensor:
    """``[B]`` class labels for accuracies: the labels, or a mixed batch's dominant ones."""
    return targets.dominant() if isinstance(targets, MixedTargets) else targets


def labelled_mask(targets: Tensor) -> Tensor:
    """``[B]`` bool: which rows carry a label (``targets != UNLABELLED``)."""
    return targets != UNLABELLED


def labelled_mean(per_example: Tensor, targets: Tensor) -> Tensor:
    r"""Mean of a per-example label term over the labelled rows only.

    .. math:: \frac{1}{\max(1, |L|)} \sum_{i \in L} \ell_i, \qquad L = \{i : y_i \ne -1\}

    Unlabelled rows are masked with ``where`` (not multiplied), so a non-finite value there can
    neither reach the result nor its gradient; a batch without labelled rows gives 0.
    (A per-example term of a mixed batch is computed per part, with :func:`mixed`.)
    """
    if isinstance(targets, MixedTargets):
        raise TypeError("labelled_mean got MixedTargets: compute the per-example term for each "
                        "part with kd_lightning.losses.labels.mixed(lambda t: ..., targets).")
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
    and zero gradient; 0 when no row is labelled. Computed in float32. With
    :class:`MixedTargets`: ``lam CE(a) + (1 - lam) CE(b)`` (:func:`mixed`).
    """
    if isinstance(targets, MixedTargets):
        return mixed(lambda t: labelled_cross_entropy(logits, t), targets)
    return _where_labelled(F.cross_entropy(logits.float(), targets, ignore_index=UNLABELLED),
                           targets)


def labelled_nll(log_probs: Tensor, targets: Tensor) -> Tensor:
    """``F.nll_loss`` averaged over the labelled rows (0 when there are none); with
    :class:`MixedTargets` ``lam NLL(a) + (1 - lam) NLL(b)``."""
    if isinstance(targets, MixedTargets):
        return mixed(lambda t: labelled_nll(log_probs, t), targets)
    return _where_labelled(F.nll_loss(log_probs, targets, ignore_index=UNLABELLED), targets)


__all__ = ["UNLABELLED", "MixedTargets", "labelled_cross_entropy", "labelled_mask", "labelled_mean",
           "labelled_nll", "mixed", "target_classes"]
