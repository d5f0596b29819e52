"""Response-based KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015."""

from __future__ import annotations

from kd_lightning.losses import response_terms
from kd_lightning.methods.base import DistillationModule, Losses
from kd_lightning.methods.checks import check_temperature, check_weights


class ResponseKD(DistillationModule):
    r"""Hinton KD: :math:`w_{ce}\,CE(y, z_s) + w_{kd}\,T^2\,KL(\sigma(z_t/T) \| \sigma(z_s/T))`.

    Args:
        temperature: softmax temperature ``T > 0`` (default 4; Hinton et al. use up to 20).
        ce_weight: weight of the cross-entropy with the labels (default 0.1).
        kd_weight: weight of the soft-target term (default 0.9; the paper's ``alpha``, with
            ``ce_weight = 1 - alpha``).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule` (student, teacher,
            teacher_checkpoint, optimizer, ...).
    """

    requires_teacher = True

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 **kwargs) -> None:
        check_temperature(type(self).__name__, temperature)
        check_weights(type(self).__name__, ce_weight=ce_weight, kd_weight=kd_weight)
        super().__init__(**kwargs)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight

    def compute_losses(self, x, y, index):
        logits = self.student(x)
        return Losses(logits, response_terms(logits, y, self.teacher_logits(x, index),
                                             self.temperature, self.ce_weight, self.kd_weight))
