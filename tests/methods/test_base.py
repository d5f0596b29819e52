"""The base class: gradients reach the student only, the teacher is required where a method needs
one, a plain student learns, a diverged run stops."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import ResponseKD, Supervised
from kd_lightning.models import MLP, ConvNet1D


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                    devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


def test_training_step_gradients_reach_student_only():
    teacher = ConvNet1D(width=8)
    m = ResponseKD(student=MLP(), teacher=teacher, num_classes=10)
    x, y, idx = torch.randn(6, 1, 40), torch.randint(0, 10, (6,)), torch.arange(6)
    loss = m.training_step((x, y, idx), 0)
    loss.backward()
    assert all(p.grad is not None for p in m.student.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())


def test_response_kd_requires_teacher():
    with pytest.raises(KDConfigError, match="no teacher was given"):
        ResponseKD(student=MLP())


def test_supervised_learns_digits():
    pl.seed_everything(0)
    model = Supervised(student=MLP(input_dim=64), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dm = DistillDataModule("digits", batch_size=64)
    trainer = _trainer(max_epochs=15, limit_val_batches=None)
    trainer.fit(model, dm)
    assert float(trainer.callback_metrics["val/acc"]) > 0.9


def test_a_diverged_run_stops_with_a_message_instead_of_finishing():
    from kd_lightning.methods.base import Losses
    from kd_lightning.training import TrainingDiverged

    class Exploding(Supervised):
        def compute_losses(self, x, y, index):
            logits, terms, _ = super().compute_losses(x, y, index)
            if self.current_epoch == 1:  # a nan appears in the second epoch
                terms["loss_ce"] = terms["loss_ce"] * float("nan")
            return Losses(logits, terms)

    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, accelerator="cpu", limit_val_batches=0,
                         log_every_n_steps=1)
    with pytest.raises(TrainingDiverged, match=r"loss.* became nan or inf between global steps"):
        trainer.fit(Exploding(student=MLP(), num_classes=10), DistillDataModule("mnist1d", train_subset=200))
    assert trainer.current_epoch == 1
