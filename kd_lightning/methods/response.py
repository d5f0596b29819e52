"""Response-based KD: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015."""

from __future__ import annotations

from kd_lightning.losses import response_kd_loss
from kd_lightning.methods.base import DistillationModule, check_kd_hyperparameters


class ResponseKD(DistillationModule):
    r"""Hinton KD: :math:`(1-\alpha)\,CE(y, z_s) + \alpha\,T^2\,KL(\sigma(z_t/T) \| \sigma(z_s/T))`.

    Args:
        temperature: softmax temperature ``T > 0`` (default 4).
        alpha: weight of the soft-target term, in [0, 1] (default 0.9).
        **kwargs: see :class:`~kd_lightning.methods.base.DistillationModule` (student, teacher,
            teacher_checkpoint, optimizer, ...).
    """

    requires_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, **kwargs) -> None:
        check_kd_hyperparameters("ResponseKD", temperature, alpha)
        super().__init__(**kwargs)
        self.temperature, self.alpha = temperature, alpha

    def training_step(self, batch, batch_idx: int):
        x, y, idx = batch
        logits = self.student(x)
        loss, ce, kd = response_kd_loss(logits, self.teacher_logits(x, idx), y,
                                        self.temperature, self.alpha)
        self.log_terms(logits, y, loss=loss, loss_ce=ce, loss_kd=kd)
        return loss
