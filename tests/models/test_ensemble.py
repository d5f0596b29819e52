"""EnsembleTeacher: the average prediction of several networks as one teacher."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.losses import kd_loss
from kd_lightning.methods import (DIST, AttentionTransfer, DecoupledKD, FitNet, LogitMatching,
                                  ProbabilisticKnowledgeTransfer, RelationKD, ResponseKD,
                                  StandardizedKD, WassersteinKD)
from kd_lightning.models import MLP, ConvNet1D, EnsembleTeacher
from tests.conftest import CONFIGS, TINY, run_cli


def constant(logits: list[float], inputs: int = 3) -> nn.Linear:
    """A network whose logits are ``logits`` whatever the input (zero weights, the bias)."""
    net = nn.Linear(inputs, len(logits))
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor(logits))
    return net


def test_probs_average_is_the_log_of_the_mean_probability():
    # member A: probabilities (0.2, 0.8); member B: (0.6, 0.4); their mean is (0.4, 0.6)
    a, b = constant([0.0, math.log(4.0)]), constant([math.log(1.5), 0.0])
    out = EnsembleTeacher([a, b])(torch.randn(5, 3))
    assert out.shape == (5, 2)
    assert torch.allclose(out, torch.log(torch.tensor([0.4, 0.6])).expand(5, 2), atol=1e-6)
    assert torch.allclose(out.softmax(-1), torch.tensor([0.4, 0.6]).expand(5, 2), atol=1e-6)


def test_logits_average_is_the_mean_logit():
    a, b = constant([0.0, math.log(4.0)]), constant([math.log(1.5), 0.0])
    out = EnsembleTeacher([a, b], average="logits")(torch.randn(2, 3))
    expected = torch.tensor([math.log(1.5) / 2, math.log(4.0) / 2])
    assert torch.allclose(out, expected.expand(2, 2), atol=1e-6)
    # = the renormalised geometric mean of the members' probabilities: (sqrt(.2*.6), sqrt(.8*.4))
    geo = torch.tensor([math.sqrt(0.2 * 0.6), math.sqrt(0.8 * 0.4)])
    assert torch.allclose(out.softmax(-1)[0], geo / geo.sum(), atol=1e-6)


def test_ensemble_equals_the_average_of_real_networks():
    torch.manual_seed(0)
    members = [ConvNet1D(width=8), MLP(hidden_dims=[16]), ConvNet1D(width=4)]
    ens = EnsembleTeacher(members).eval()
    x = torch.randn(7, 1, 40)
    mean_p = sum(m(x).softmax(-1) for m in members) / 3
    assert torch.allclose(ens(x).softmax(-1), mean_p, atol=1e-6)
    assert torch.allclose(ens(x), mean_p.log(), atol=1e-5)


def test_members_load_their_own_checkpoints(tmp_path):
    torch.manual_seed(1)
    trained = [ConvNet1D(width=8), MLP(hidden_dims=[16])]
    paths = [tmp_path / "cnn.pt", tmp_path / "mlp.ckpt"]
    torch.save(trained[0].state_dict(), paths[0])  # a plain state_dict
    torch.save({"state_dict": {f"student.{k}": v for k, v in trained[1].state_dict().items()}},
               paths[1])  # the layout of a `kd-lightning fit` checkpoint of Supervised
    torch.manual_seed(2)
    ens = EnsembleTeacher([ConvNet1D(width=8), MLP(hidden_dims=[16])], checkpoints=[str(p) for p in paths])
    for loaded, original in zip(ens.members, trained):
        for (k, v), w in zip(loaded.state_dict().items(), original.state_dict().values()):
            assert torch.equal(v, w), k


def test_member_without_checkpoint_is_used_as_it_is(tmp_path):
    torch.manual_seed(3)
    kept = MLP(hidden_dims=[8])
    before = {k: v.clone() for k, v in kept.state_dict().items()}
    path = tmp_path / "a.pt"
    torch.save(MLP(hidden_dims=[8]).state_dict(), path)
    ens = EnsembleTeacher([MLP(hidden_dims=[8]), kept], checkpoints=[str(path), None])
    assert all(torch.equal(ens.members[1].state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(members=[]), "non-empty list of networks"),
    (dict(members=[MLP()], checkpoints=["a.pt", "b.pt"]), "1 members but 2 checkpoints"),
    (dict(members=[MLP()], average="median"), "average must be one of"),
    (dict(members=[MLP()], checkpoints=["missing.ckpt"]), "member 0: teacher checkpoint 'missing.ckpt' "
                                                          "does not exist"),
])
def test_bad_ensembles_are_refused(kwargs, message):
    with pytest.raises(KDConfigError, match=message):
        EnsembleTeacher(**kwargs)


def test_member_checkpoint_of_another_architecture_names_the_member(tmp_path):
    path = tmp_path / "w16.pt"
    torch.save(ConvNet1D(width=16).state_dict(), path)
    with pytest.raises(KDConfigError, match=r"member 1: .*'conv1.weight' has shape \(16, 1, 5\)"):
        EnsembleTeacher([ConvNet1D(width=16), ConvNet1D(width=8)], checkpoints=[None, str(path)])


def test_members_with_different_class_counts_are_refused():
    ens = EnsembleTeacher([MLP(num_classes=10), MLP(num_classes=5)])
    with pytest.raises(KDConfigError, match="outputs differ in shape"):
        ens(torch.randn(2, 40))


def _ensemble() -> EnsembleTeacher:
    return EnsembleTeacher([ConvNet1D(width=8), ConvNet1D(width=4), MLP(hidden_dims=[16])])


@pytest.mark.parametrize("method, kwargs", [
    (ResponseKD, {}), (DecoupledKD, {}), (DIST, {}), (StandardizedKD, {}), (LogitMatching, {}),
    (WassersteinKD, {"eps": 0.1}),
])
def test_response_methods_distil_from_an_ensemble(method, kwargs):
    m = method(student=MLP(), teacher=_ensemble(), num_classes=10, **kwargs)
    m.train()
    assert not m.teacher.training and not any(net.training for net in m.teacher.members)
    x, y, idx = torch.randn(6, 1, 40), torch.randint(0, 10, (6,)), torch.arange(6)
    loss = m.training_step((x, y, idx), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in m.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())


def test_response_kd_soft_term_is_taken_against_the_ensemble_prediction():
    m = ResponseKD(student=MLP(), teacher=_ensemble(), num_classes=10, ce_weight=0.0, kd_weight=1.0)
    x, y = torch.randn(6, 1, 40), torch.randint(0, 10, (6,))
    losses = m.compute_losses(x, y, torch.arange(6))
    members = [net(x).softmax(-1) for net in m.teacher.members]
    expected = kd_loss(losses.logits, (sum(members) / 3).log(), 4.0)
    assert torch.allclose(losses.terms["loss_kd"], expected, atol=1e-6)


@pytest.mark.parametrize("method, kwargs", [
    (FitNet, dict(student_layers=["relu1"], teacher_layers=["relu1"])),
    (AttentionTransfer, dict(student_layers=["relu1"])),
    (RelationKD, {}),  # default embedding: the input of the last nn.Linear
    (ProbabilisticKnowledgeTransfer, dict(student_layer="fc", teacher_layer="fc", layer_input=True)),
])
def test_feature_methods_cannot_tap_an_ensemble(method, kwargs):
    with pytest.raises(KDConfigError, match="EnsembleTeacher, which has no single feature map"):
        method(student=ConvNet1D(width=8), teacher=_ensemble(), num_classes=10, **kwargs)


def test_response_kd_trains_from_an_ensemble_and_keeps_it_frozen():
    pl.seed_everything(0)
    ens = _ensemble()
    before = {k: v.clone() for k, v in ens.state_dict().items()}
    student = MLP()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    model = ResponseKD(student=student, teacher=ens, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, DistillDataModule("mnist1d", batch_size=50, train_subset=200))
    assert model.teacher_cache_used  # the ensemble's logits are cached per example like any teacher
    assert all(torch.equal(model.teacher.state_dict()[k], v) for k, v in before.items())
    assert any(not torch.equal(model.student.state_dict()[k], v) for k, v in start.items())
    assert math.isfinite(float(trainer.callback_metrics["val/acc"]))
    assert 0.0 <= float(trainer.callback_metrics["val/distill_error"]) <= 1.0


def test_shipped_ensemble_config_fits_and_tests_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = ["runs/mnist1d_teacher/checkpoints/best.ckpt",
             "runs/mnist1d_teacher_member/seed1/checkpoints/best.ckpt",
             "runs/mnist1d_teacher_member/seed2/checkpoints/best.ckpt"]
    nets = []
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        nets.append(ConvNet1D(num_classes=10, width=64).eval())
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(nets[-1].state_dict(), tmp_path / path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/response_ensemble.yaml", *TINY,
                   "--trainer.limit_test_batches", "1.0", "--data.eval_batch_size", "1000"])
    teacher = cli.model.teacher
    assert isinstance(teacher, EnsembleTeacher) and len(teacher.members) == 3
    for loaded, original in zip(teacher.members, nets):
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                     original.state_dict().values()))
    # the logged teacher accuracy is the accuracy of the members' mean probability
    x, y = cli.datamodule.test_dataset.get_batch(torch.arange(len(cli.datamodule.test_dataset)))[:2]
    with torch.no_grad():
        mean_p = sum(net(x).softmax(-1) for net in nets) / 3
    acc = (mean_p.argmax(-1) == y).float().mean()
    assert float(cli.trainer.callback_metrics["test/teacher_acc"]) == pytest.approx(float(acc), abs=1e-6)
