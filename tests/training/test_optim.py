"""Optimizers and LR schedules: the warm-up cosine schedule and the opt-in fused optimizer."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from kd_lightning.data import DistillDataModule
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP
from kd_lightning.training import LinearWarmupCosineAnnealingLR


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                    devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


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
