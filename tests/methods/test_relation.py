"""Relational KD as a method: its embedding, its terms, bad arguments, the CLI and DDP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.losses import kd_loss, rkd_loss
from kd_lightning.methods import RelationKD
from kd_lightning.models import MLP, ConvNet1D, LeNet5, LeNet5Half, TorchvisionModel, resnet8
from tests.conftest import run_cli_error
from tests.methods.test_wasserstein import _args, _batch, _ddp_run


# ---- RelationKD method ---------------------------------------------------------------------
def _rkd(**kw) -> RelationKD:
    torch.manual_seed(0)
    return RelationKD(student=MLP(), teacher=ConvNet1D(width=8), num_classes=10, **kw)


def test_relation_kd_default_embedding_is_the_penultimate_feature():
    m = _rkd()
    x = torch.randn(5, 1, 40)
    for net, taps in ((m.student, m.student_taps), (m.teacher, m.teacher_taps)):
        assert taps.layers == ["fc"]
        net(x)
        (emb,) = taps.pop()
        assert torch.equal(emb, net.forward_features(x))
    for net in (resnet8(num_classes=10), LeNet5(), TorchvisionModel("resnet18", num_classes=10)):
        tm = RelationKD(student=LeNet5Half(), teacher=net, num_classes=10)
        assert tm.teacher_taps.layers[0] in ("fc", "model.fc")
    explicit = _rkd(student_layer="relu1", teacher_layer="conv3")
    assert explicit.student_taps.layers == ["relu1"] and explicit.teacher_taps.pre_activation == [False]


def test_relation_kd_step_composes_its_terms_and_trains_the_student_only():
    m = _rkd(kd_weight=0.5)
    x, y, idx = _batch(6)
    loss = m.training_step((x, y, idx), 0)
    with torch.no_grad():
        s, t = m.student.forward_features(x), m.teacher.forward_features(x)
        _, d, a = rkd_loss(s, t)
        ce = F.cross_entropy(m.student(x), y)
        kd = kd_loss(m.student(x), m.teacher(x), 4.0)
    assert loss.item() == pytest.approx((ce + 25 * d + 50 * a + 0.5 * kd).item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in m.student.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())
    assert set(m.term_log.names) == {"loss", "loss_ce", "loss_rkd", "loss_rkd_d", "loss_rkd_a", "loss_kd"}
    assert "train/acc" in m.term_log.means()  # training accuracy is logged too


def test_relation_kd_bad_arguments_and_batches():
    with pytest.raises(KDConfigError, match="distance_weight must be >= 0"):
        _rkd(distance_weight=-1.0)
    with pytest.raises(KDConfigError, match="both 0"):
        _rkd(distance_weight=0.0, angle_weight=0.0)
    with pytest.raises(KDConfigError, match="no module 'fc9'. Nearest module names: fc"):
        _rkd(student_layer="fc9")
    with pytest.raises(KDConfigError, match="no nn.Linear classifier"):
        RelationKD(student=MLP(), teacher=nn.Sequential(nn.Flatten(), nn.Identity()), num_classes=10)
    x, y, idx = _batch(1)
    with pytest.raises(KDConfigError, match="at least 2 examples per batch"):
        _rkd().training_step((x, y, idx), 0)


# ---- through the CLI -----------------------------------------------------------------------
def test_cli_rkd_batch_of_one_is_explained(mnist1d_teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_cli_error(_args("mnist1d/relation.yaml", mnist1d_teacher, "--data.batch_size", "1"), capsys)
    assert "at least 2 examples per batch" in err and "a batch of 1 has none" in err


# ---- DDP: two CPU processes, through the console script --------------------------------------
@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_two_cpu_processes_relation(mnist1d_teacher, tmp_path):
    _ddp_run("mnist1d/relation.yaml", mnist1d_teacher, tmp_path)
