"""DKD, DIST and logit-standardised KD as methods: invariances and DKD's warm-up."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.losses import dkd_terms, kd_loss
from kd_lightning.methods import DIST, DecoupledKD, StandardizedKD
from tests.conftest import tb_scalars
from tests.methods.test_no_auxiliary_modules import _batch, _method, _teacher


def test_standardized_kd_ignores_scale_and_shift_of_the_logits_where_kd_does_not():
    teacher = _teacher()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # student logits = 3 z_t + 5
        student.fc.weight.mul_(3.0)
        student.fc.bias.mul_(3.0).add_(5.0)
    m = _method(StandardizedKD, student, teacher)
    x, y, idx = _batch()
    terms = m.compute_losses(x, y, idx).terms
    assert terms["loss_kd"].item() < 1e-6
    assert kd_loss(student(x), teacher(x), 2.0).item() > 0.1


def test_dist_is_zero_when_the_student_predicts_like_the_teacher():
    teacher = _teacher()
    terms = _method(DIST, copy.deepcopy(teacher), teacher).compute_losses(*_batch()).terms
    assert abs(terms["loss_inter"].item()) < 1e-4 and abs(terms["loss_intra"].item()) < 1e-4
    other = _method(DIST, teacher=teacher).compute_losses(*_batch()).terms  # a different student
    assert other["loss_inter"].item() > 0.01 and other["loss_intra"].item() > 0.01


# ---- the DKD warm-up -------------------------------------------------------------------------
@pytest.mark.parametrize("warmup, weights", [(10, [0.1, 0.5, 1.0, 1.0, 1.0]), (0, [1.0] * 5)])
def test_dkd_warmup_is_linear_in_the_epoch(warmup, weights, monkeypatch):
    epoch = {"e": 0}
    monkeypatch.setattr(DecoupledKD, "current_epoch", property(lambda self: epoch["e"]))
    m = _method(DecoupledKD, warmup_epochs=warmup)
    x, y, idx = _batch()
    tckd, nckd = dkd_terms(m.student(x), m.teacher(x), y, 4.0)
    for e, w in zip([0, 4, 9, 10, 30], weights):
        epoch["e"] = e
        terms = m.compute_losses(x, y, idx).terms
        assert m.warmup_weight == pytest.approx(w)
        torch.testing.assert_close(terms["loss_tckd"], w * 1.0 * tckd)
        torch.testing.assert_close(terms["loss_nckd"], w * 8.0 * nckd)


def test_dkd_warmup_resumes_from_the_checkpoint_epoch(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    def fit(ckpt_path=None, version=0):
        m = _method(DecoupledKD, warmup_epochs=4)
        trainer = pl.Trainer(
            max_epochs=3, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", devices=1,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
            logger=TensorBoardLogger(tmp_path, name="dkd", version=version),
            callbacks=[ModelCheckpoint(dirpath=tmp_path / f"ckpts{version}", filename="{epoch}",
                                       save_top_k=-1, every_n_epochs=1)])
        trainer.fit(m, DistillDataModule("mnist1d", batch_size=50, train_subset=100),
                    ckpt_path=ckpt_path)
        return tb_scalars(tmp_path / "dkd" / f"version_{version}")

    assert fit()["train/dkd_warmup"] == pytest.approx([0.25, 0.5, 0.75])
    resumed = fit(tmp_path / "ckpts0" / "epoch=0.ckpt", version=1)
    assert resumed["train/dkd_warmup"] == pytest.approx([0.5, 0.75])


def test_dkd_warmup_as_a_fraction_of_max_epochs(monkeypatch):
    epoch = {"e": 0}
    monkeypatch.setattr(DecoupledKD, "current_epoch", property(lambda self: epoch["e"]))
    m = _method(DecoupledKD, warmup_epochs=0.25)
    m.trainer = pl.Trainer(max_epochs=40, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    for e, w in ((0, 1 / 10), (4, 5 / 10), (9, 1.0), (30, 1.0)):  # 0.25 of 40 = 10 epochs
        epoch["e"] = e
        assert m.warmup_weight == pytest.approx(w)
    m.trainer.fit_loop.max_epochs = 6  # 1.5 epochs, unrounded: the ramp ends within epoch 1
    epoch["e"] = 0
    assert m.warmup_weight == pytest.approx(1 / 1.5)
    m.trainer.fit_loop.max_epochs = -1
    with pytest.raises(KDConfigError, match="warmup_epochs=0.25 is a fraction of trainer.max_epochs"):
        m.warmup_weight
