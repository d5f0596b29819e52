"""The frozen teacher: eval mode, no gradients, and its per-example logit and feature caches."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import ResponseKD
from kd_lightning.models import MLP, ConvNet1D


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                    devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(40, 10), nn.Dropout(0.5))
    m = ResponseKD(student=MLP(), teacher=teacher)
    m.train()
    assert m.student.training and not m.teacher.training
    assert all(not p.requires_grad for p in m.teacher.parameters())
    learnable = {id(p) for p in m.learnable_parameters()}
    assert learnable == {id(p) for p in m.student.parameters()}


def test_teacher_cache_gives_the_same_student_as_no_cache():
    students = {}
    for cache in (True, False):
        pl.seed_everything(3)
        teacher = ConvNet1D(width=16)
        pl.seed_everything(5)
        model = ResponseKD(student=MLP(), teacher=teacher, teacher_cache=cache,
                           optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
        dm = DistillDataModule("mnist1d", batch_size=50, train_subset=200)
        trainer = _trainer(max_epochs=2)
        trainer.fit(model, dm)
        students[cache] = model.student.state_dict()
        assert (model.teacher_cache_used is True) == cache
    for k in students[True]:
        assert torch.allclose(students[True][k], students[False][k], atol=1e-5), k


def test_teacher_cache_turns_off_under_augmentation(tmp_path):
    from tests.conftest import write_cifar
    from kd_lightning.models import resnet8

    write_cifar(tmp_path, 10, n_train=60, n_test=20)
    model = ResponseKD(student=resnet8(), teacher=resnet8())
    dm = DistillDataModule("cifar10", root=str(tmp_path), batch_size=20, augment=True, val_split=10)
    _trainer(limit_train_batches=1).fit(model, dm)
    assert model.teacher_cache_used is False
    forced = ResponseKD(student=resnet8(), teacher=resnet8(), teacher_cache=True)
    with pytest.raises(KDConfigError, match="teacher_cache=true needs deterministic"):
        _trainer(limit_train_batches=1).fit(forced, dm)


@pytest.mark.parametrize("budget_mb, features_cached", [(512.0, True), (0.001, False)])
def test_teacher_feature_cache_matches_a_fresh_forward(budget_mb, features_cached):
    class Probe(ResponseKD):
        def on_train_end(self):  # inspect the cache before it is released
            dm = self.trainer.datamodule
            x, _, idx = dm.train_dataset.get_batch(torch.arange(7))
            self.cached = self.teacher_forward(x, idx)
            self.feature_cache_used = self.frozen_teacher.cache.complete
            self.eval()
            self.fresh = self.teacher_forward(x, idx)  # eval mode: never from the cache
            super().on_train_end()

    model = Probe(student=MLP(), teacher=ConvNet1D(width=8), teacher_cache_mb=budget_mb)
    model.tap_teacher(["conv2", "relu3"], pre_activation=[False, True])
    _trainer(max_steps=2).fit(model, DistillDataModule("mnist1d", train_subset=100))
    assert model.feature_cache_used is features_cached
    (lc, fc), (lf, ff) = model.cached, model.fresh
    assert torch.allclose(lc, lf, atol=1e-6)
    assert len(fc) == len(ff) == 2
    for a, b in zip(fc, ff):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


class _CountingTeacher(ConvNet1D):
    """Counts the examples its forward sees while the trainer validates."""

    def __init__(self):
        super().__init__(width=8)
        self.val_examples = 0

    def forward(self, x):
        trainer = getattr(self, "trainer_ref", None)
        if trainer is not None and (trainer.validating or trainer.sanity_checking):
            self.val_examples += x.shape[0]
        return super().forward(x)


def _fit_counting(cache_mb: float, epochs: int = 3):
    pl.seed_everything(3)
    teacher = _CountingTeacher()
    pl.seed_everything(5)
    model = ResponseKD(student=MLP(), teacher=teacher, teacher_cache_mb=cache_mb,
                       optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    dm = DistillDataModule("mnist1d", batch_size=50, train_subset=200, eval_batch_size=64)
    trainer = _trainer(max_epochs=epochs, limit_val_batches=None, num_sanity_val_steps=2)
    teacher.trainer_ref = trainer
    history = []

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                history.append((float(pl_module.val_distill_error.compute()),
                                float(pl_module.val_teacher_agreement.compute())))

    trainer.callbacks.append(Record())
    trainer.fit(model, dm)
    return model, dm, teacher, history


def test_validation_teacher_logits_are_computed_once_per_batch_and_equal_a_fresh_forward():
    model, dm, teacher, cached = _fit_counting(512.0)
    n_val = len(dm.val_dataset)
    # the sanity check's 2 batches and then each batch once: not once per epoch
    assert teacher.val_examples == n_val
    assert model.frozen_teacher.val_cache.nbytes == 0  # released at the end of the fit
    _, _, teacher_off, fresh = _fit_counting(0.0)  # no room: the teacher runs every epoch
    assert teacher_off.val_examples == 3 * n_val + 2 * 64
    assert len(cached) == len(fresh) == 3
    for (e1, a1), (e2, a2) in zip(cached, fresh):  # same logits, so the same metrics
        assert e1 == pytest.approx(e2, rel=1e-6, abs=1e-9) and a1 == a2


def test_validation_teacher_cache_needs_deterministic_evaluation_inputs_and_a_fit(monkeypatch):
    with monkeypatch.context() as patch:  # a data module whose evaluation inputs may change
        patch.setattr(DistillDataModule, "deterministic_eval", property(lambda self: False))
        _, dm, teacher, _ = _fit_counting(512.0)
    assert teacher.val_examples == 3 * len(dm.val_dataset) + 2 * 64
    model, dm, teacher, _ = _fit_counting(512.0, epochs=1)
    teacher.val_examples = 0
    trainer = _trainer(limit_val_batches=None)
    teacher.trainer_ref = trainer
    trainer.validate(model, dm)  # `validate` runs the teacher: its data may be other data
    trainer.validate(model, dm)
    assert teacher.val_examples >= 2 * len(dm.val_dataset)  # each validation saw every example
