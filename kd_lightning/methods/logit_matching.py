"""Logit matching: Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014."""

from __future__ import annotations

from kd_lightning.losses.labels import labelled_cross_entropy
from kd_lightning.losses.logit_matching import logit_matching_loss
from kd_lightning.methods.base import DistillationModule, Losses
from kd_lightning.methods.checks import check_weights


class LogitMatching(DistillationModule):
    r"""The student regresses the teacher's logits:
    :math:`L = w_{ce}\,CE(y, z_s) + w_{t}\,\frac{1}{2}\|z_s - z_t\|^2`.

    Args:
        ce_weight: weight of the cross-entropy with the labels (default 0: the paper trains on
            the teacher's logits alone).
        transfer_weight: weight of the logit regression (default 1).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule`.
    """

    requires_teacher = True

    def __init__(self, ce_weight: float = 0.0, transfer_weight: float = 1.0, **kwargs) -> None:
        check_weights("LogitMatching", ce_weight=ce_weight, transfer_weight=transfer_weight)
        super().__init__(**kwargs)
        self.ce_weight, self.transfer_weight = ce_weight, transfer_weight

    def compute_losses(self, x, y, index):
        logits = self.student(x)
        match = logit_matching_loss(logits, self.teacher_logits(x, index))
        terms = {"loss_logit": self.transfer_weight * match}
        if self.ce_weight > 0:
            terms["loss_ce"] = self.ce_weight * labelled_cross_entropy(logits, y)
        return Losses(logits, terms)
