"""Plain supervised training: teachers and the no-distillation (student alone) baseline."""

from __future__ import annotations

import torch.nn.functional as F

from kd_lightning.methods.base import DistillationModule, Losses


class Supervised(DistillationModule):
    """Cross-entropy training of ``student`` alone: :math:`L = CE(y, p_s)`.

    Used to train teachers (whose checkpoints other methods load as ``teacher_checkpoint``) and
    as the student-alone baseline every method is compared with.
    """

    def compute_losses(self, x, y, index):
        logits = self.student(x)
        return Losses(logits, {"loss_ce": F.cross_entropy(logits.float(), y)})
