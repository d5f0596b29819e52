"""Per-window logging of the loss terms."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl

from kd_lightning.data import DistillDataModule
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                    devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


def test_train_terms_logged_per_window_and_at_the_last_epoch(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tests.conftest import tb_scalars

    pl.seed_everything(0)
    model = Supervised(student=MLP())
    logger = TensorBoardLogger(str(tmp_path), name="t")
    # 1 step per epoch (M=10, batch 100), 7 epochs, a window of 3 steps -> logs after steps 3, 6, 7
    trainer = _trainer(max_epochs=7, logger=logger, log_every_n_steps=3)
    trainer.fit(model, DistillDataModule("mnist1d", train_subset=10))
    scalars = tb_scalars(tmp_path / "t" / "version_0")
    assert len(scalars["train/loss"]) == 3
    assert len(scalars["train/acc"]) == 3 and all(0 <= a <= 1 for a in scalars["train/acc"])


def test_logged_train_loss_is_the_mean_of_the_step_losses():
    class Record(pl.Callback):
        losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    pl.seed_everything(0)
    rec = Record()
    trainer = _trainer(max_epochs=1, callbacks=[rec])
    trainer.fit(Supervised(student=MLP()), DistillDataModule("mnist1d", train_subset=300))
    assert len(rec.losses) == 3
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(sum(rec.losses) / 3, rel=1e-6)
    assert 0.0 <= float(trainer.callback_metrics["train/acc"]) <= 1.0
