"""The worked example of the docs' "Adding a method" page: loss by hand, method terms, CLI run."""

from __future__ import annotations

import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.losses.logit_matching import logit_matching_loss
from kd_lightning.methods import LogitMatching
from kd_lightning.models import MLP, ConvNet1D
from tests.conftest import CONFIGS, TINY, run_cli


def test_logit_matching_loss_by_hand():
    zs = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]], requires_grad=True)
    zt = torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    # 0.5 * mean over examples of the squared distance: (4 + (1 + 4)) / 2 / 2 = 2.25
    loss = logit_matching_loss(zs, zt)
    assert loss.item() == pytest.approx(2.25)
    loss.backward()
    assert torch.allclose(zs.grad, (zs - zt).detach() / 2)  # d/dz_s = (z_s - z_t) / B


def test_logit_matching_terms_and_gradients_reach_the_student_only():
    torch.manual_seed(0)
    m = LogitMatching(student=MLP(), teacher=ConvNet1D(width=8), num_classes=10, ce_weight=0.5,
                      transfer_weight=2.0)
    x, y, idx = torch.randn(4, 1, 40), torch.randint(0, 10, (4,)), torch.arange(4)
    logits, terms, _ = m.compute_losses(x, y, idx)
    with torch.no_grad():
        expected = 2.0 * logit_matching_loss(m.student(x), m.teacher(x))
    assert torch.allclose(terms["loss_logit"], expected)
    assert set(terms) == {"loss_logit", "loss_ce"}
    m.training_step((x, y, idx), 0).backward()
    assert all(p.grad is not None for p in m.student.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())


def test_logit_matching_bad_weight():
    with pytest.raises(KDConfigError, match="transfer_weight must be >= 0"):
        LogitMatching(student=MLP(), teacher=MLP(), num_classes=10, transfer_weight=-1.0)


def test_logit_matching_config_runs_through_the_cli(mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(CONFIGS / "mnist1d" / "logit_matching.yaml"), *TINY,
                   "--model.init_args.teacher_checkpoint", mnist1d_teacher])
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
