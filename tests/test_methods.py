"""Behaviour of the base class and methods outside the CLI."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import ResponseKD, Supervised
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.models.weights import load_teacher_weights
from kd_lightning.training import LinearWarmupCosineAnnealingLR


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


def test_checkpoint_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(ConvNet1D(width=16).state_dict(), path)
    with pytest.raises(KDConfigError, match=r"'conv1.weight' has shape \(16, 1, 5\) .* \(25, 1, 5\)"):
        load_teacher_weights(ConvNet1D(width=25), path)
    # a prefixed plain state_dict (as saved from a wrapper module) loads
    net = ConvNet1D(width=16)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    other = ConvNet1D(width=16)
    load_teacher_weights(other, path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))


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


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LinearWarmupCosineAnnealingLR(opt, warmup_epochs=5, max_epochs=15, warmup_start_factor=0.1)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:6]))  # warm-up rises
    assert lrs[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_supervised_learns_digits():
    pl.seed_everything(0)
    model = Supervised(student=MLP(input_dim=64), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    dm = DistillDataModule("digits", batch_size=64)
    trainer = _trainer(max_epochs=15, limit_val_batches=None)
    trainer.fit(model, dm)
    assert float(trainer.callback_metrics["val/acc"]) > 0.9


def test_fused_optimizer_is_opt_in_and_matches_the_loop_version():
    from kd_lightning.training import use_fused_kernel

    net = MLP()
    assert use_fused_kernel(torch.optim.Adam(net.parameters(), lr=1e-2)).defaults["fused"] is True
    assert use_fused_kernel(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)).defaults["fused"]
    explicit = torch.optim.Adam(net.parameters(), foreach=True)
    assert use_fused_kernel(explicit) is explicit  # what the user set explicitly is kept
    rms = torch.optim.RMSprop(net.parameters())
    assert use_fused_kernel(rms) is rms  # no fused kernel: unchanged

    assert Supervised(student=MLP()).fused_optimizer is False  # the optimizer as configured by default
    students = {}
    for fused in (True, False):
        pl.seed_everything(1)
        model = Supervised(student=MLP(), fused_optimizer=fused,
                           optimizer=lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4))
        trainer = _trainer(max_steps=20)
        trainer.fit(model, DistillDataModule("mnist1d", train_subset=500))
        assert trainer.optimizers[0].defaults["fused"] is (True if fused else None)
        students[fused] = model.student.state_dict()
    for k in students[True]:  # same update rule: equal up to float rounding
        assert torch.allclose(students[True][k], students[False][k], atol=1e-5), k


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
