"""Plain supervised training: teachers and the no-distillation (student alone) baseline."""

from __future__ import annotations

from pytorch_lightning.utilities import rank_zero_warn

from kd_lightning.losses import labelled_cross_entropy
from kd_lightning.methods.base import DistillationModule, Losses


class Supervised(DistillationModule):
    """Cross-entropy training of ``student`` alone: :math:`L = CE(y, p_s)`.

    Used to train teachers (whose checkpoints other methods load as ``teacher_checkpoint``) and
    as the student-alone baseline every method is compared with.

    Unlabelled transfer examples (``data.unlabelled``) contribute nothing: the cross-entropy
    averages over each batch's labelled rows. They only change which labelled examples share a
    batch (fewer per batch, more batches per epoch), so a run with them is the student-alone
    control of a distillation run with them; a warning says so at the start of training.
    """

    def compute_losses(self, x, y, index):
        logits = self.student(x)
        return Losses(logits, {"loss_ce": labelled_cross_entropy(logits, y)})

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and getattr(dm, "num_unlabelled", 0):
            rank_zero_warn(
                f"Supervised trains on labels only: the {dm.num_unlabelled} unlabelled examples of "
                f"data.unlabelled contribute no loss term (they only dilute the labelled examples "
                f"across more, smaller batches). Use a distillation method to learn from them, or "
                f"drop data.unlabelled.", category=UserWarning)
