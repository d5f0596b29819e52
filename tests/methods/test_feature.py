"""FitNet, FSP, ActivationBoundary and AttentionTransfer: stages, resuming, bad input, bf16."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import FSP, ActivationBoundary, AttentionTransfer, FitNet
from kd_lightning.models import MLP, ConvNet1D, LinearConnector, resnet8
from tests.conftest import (CONFIGS, DUMP_WEIGHTS, TINY, assert_mnist1d_config_refused, run_cli, run_ddp,
                            tb_scalars)

LAYERS = {  # the MNIST-1D configs' layers
    FitNet: {"student_layers": ["relu2"]},
    FSP: {"student_pairs": [["relu1", "relu2"], ["relu2", "relu3"]], "pool": "smaller"},
    ActivationBoundary: {"student_layers": ["relu1", "relu2", "relu3"]},
    AttentionTransfer: {"student_layers": ["relu1", "relu2", "relu3"]},
}
CONFIG = {FitNet: "fitnet.yaml", FSP: "fsp.yaml", ActivationBoundary: "ab.yaml",
          AttentionTransfer: "at.yaml"}




def _method(cls, **kw):
    kw = {**LAYERS[cls], "input_shape": [1, 40], **kw}
    return cls(student=ConvNet1D(width=64, groups=4), teacher=ConvNet1D(width=64), num_classes=10,
               **kw)


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


# ---- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kw", [
    (FitNet, {"stage1_epochs": 2}), (FitNet, {"stage1_epochs": 0}),
    (FSP, {"stage1_epochs": 2}), (FSP, {"stage1_epochs": 0}),
    (ActivationBoundary, {"stage1_epochs": 2}), (ActivationBoundary, {"stage1_epochs": 0}),
    (AttentionTransfer, {}), (AttentionTransfer, {"ce_weight": 0.1, "kd_weight": 0.9}),
], ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_gradients_reach_student_and_connectors_never_teacher(cls, kw):
    m = _method(cls, **kw).train()
    x, y, idx = torch.randn(6, 1, 40), torch.randint(0, 10, (6,)), torch.arange(6)
    loss = m.training_step((x, y, idx), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert not m.teacher.training
    # the tapped layers (and what feeds them) learn
    assert m.student.conv1.weight.grad is not None and m.student.conv1.weight.grad.abs().sum() > 0
    for p in getattr(m, "connectors", torch.nn.ModuleList()).parameters():
        assert p.grad is not None
    learnable = {id(p) for p in m.learnable_parameters()}
    assert {id(p) for p in m.student.parameters()} <= learnable
    assert not learnable & {id(p) for p in m.teacher.parameters()}
    # the student's taps are gone after the step (validation runs the bare student)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.student.modules())
    if kw.get("stage1_epochs") == 2:  # stage 1: transfer only, the head gets no gradient
        assert m.student.fc.weight.grad is None


def test_fitnet_connects_an_mlp_student_to_a_cnn_teacher():
    m = FitNet(student=MLP(), teacher=ConvNet1D(width=64), student_layers=["fc"],
               teacher_layers=["relu3"], input_shape=[1, 40], stage1_epochs=1)
    assert isinstance(m.connectors[0], LinearConnector)
    assert m.connectors[0].linear.weight.shape == (64 * 5, 10)


def test_connectors_built_at_setup_from_the_data_and_stored_for_loading(tmp_path):
    m = FitNet(student=ConvNet1D(width=16), teacher=ConvNet1D(width=32), student_layers=["relu2"],
               stage1_epochs=1, num_classes=10)
    assert len(m.connectors) == 0  # no input_shape yet
    trainer = _trainer(max_epochs=2, limit_train_batches=1, enable_checkpointing=True,
                       default_root_dir=tmp_path)
    trainer.fit(m, DistillDataModule("mnist1d", batch_size=50, train_subset=100))
    assert m.connectors[0].conv.weight.shape == (32, 16, 1)
    assert m.hparams.input_shape == [1, 40]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    loaded = FitNet.load_from_checkpoint(ckpt, student=ConvNet1D(width=16), teacher=ConvNet1D(width=32))
    assert torch.equal(loaded.connectors[0].conv.weight, m.connectors[0].conv.weight)


# ---- stages ---------------------------------------------------------------------------------
class _Recorder(pl.Callback):
    def __init__(self):
        self.seen: list[tuple[int, int, tuple[str, ...]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        names = tuple(pl_module.term_log.names)
        self.seen.append((trainer.current_epoch, pl_module.stage, names))


@pytest.mark.parametrize("cls, transfer_term, task_term", [
    (FitNet, "loss_hint", "loss_kd"), (FSP, "loss_fsp", "loss_ce"),
    (ActivationBoundary, "loss_ab", "loss_ce")])
def test_stage_follows_current_epoch(cls, transfer_term, task_term, tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    m = _method(cls, stage1_epochs=0.5)  # half of max_epochs=4 -> 2 epochs of stage 1
    rec = _Recorder()
    trainer = _trainer(max_epochs=4, limit_train_batches=1, callbacks=[rec],
                       logger=TensorBoardLogger(tmp_path, name="t"), log_every_n_steps=50)
    trainer.fit(m, DistillDataModule("mnist1d", batch_size=50, train_subset=100))
    assert [(e, s) for e, s, _ in rec.seen] == [(0, 1), (1, 1), (2, 2), (3, 2)]
    for epoch, stage, names in rec.seen:
        assert (transfer_term in names) == (stage == 1) and (task_term in names) == (stage == 2)
    scalars = tb_scalars(tmp_path / "t" / "version_0")
    assert scalars["stage"] == [1.0, 1.0, 2.0, 2.0]
    # the term window is closed at the end of stage 1: two means, neither mixing the stages
    assert len(scalars[f"train/{transfer_term}"]) == 1 and len(scalars[f"train/{task_term}"]) == 1
    assert len(scalars["train/loss"]) == 2


def test_fractional_stage1_epochs_rounds_against_max_epochs():
    m = _method(FSP, stage1_epochs=0.1111)
    trainer = _trainer(max_epochs=270)
    m.trainer = trainer
    assert m.resolved_stage1_epochs() == 30
    trainer.fit_loop.max_epochs = 1
    assert m.resolved_stage1_epochs() == 0 and m.single_stage


# ---- resuming through the CLI ---------------------------------------------------------------
def test_resume_continues_in_the_stage_of_the_checkpoint(mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "every_epoch.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "ckpts", "filename": "{epoch}", "save_top_k": -1,
                       "every_n_epochs": 1}}]}}))
    args = ["fit", "--config", CONFIGS / "mnist1d/fitnet.yaml", "--config", "every_epoch.yaml",
            *TINY, "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "4",
            "--model.init_args.stage1_epochs", "2", "--model.init_args.teacher_checkpoint",
            mnist1d_teacher, "--data.train_subset", "100", "--test_after_fit", "false",
            "--trainer.limit_val_batches", "0"]
    first = run_cli(args)
    assert tb_scalars(Path(first.trainer.log_dir))["stage"] == [1.0, 1.0, 2.0, 2.0]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == [
        "epoch=0.ckpt", "epoch=1.ckpt", "epoch=2.ckpt", "epoch=3.ckpt"]
    state = torch.load(tmp_path / "ckpts/epoch=0.ckpt", weights_only=False)
    assert any(k.startswith("connectors.0.") for k in state["state_dict"])

    # written in stage 1 (after epoch 0): epoch 1 is still stage 1, then stage 2
    from_stage1 = run_cli(args + ["--ckpt_path", tmp_path / "ckpts/epoch=0.ckpt"])
    s1 = tb_scalars(Path(from_stage1.trainer.log_dir))
    assert s1["stage"] == [1.0, 2.0, 2.0]
    assert from_stage1.trainer.global_step == 4
    assert "train/loss_hint" in s1 and "train/loss_kd" in s1
    # the regressor was restored, not rebuilt
    restored = torch.load(tmp_path / "ckpts/epoch=1.ckpt", weights_only=False)["state_dict"]
    assert "connectors.0.conv.weight" in restored

    # written in stage 2 (after epoch 2): the last epoch runs in stage 2, hint loss not used
    from_stage2 = run_cli(args + ["--ckpt_path", tmp_path / "ckpts/epoch=2.ckpt"])
    s2 = tb_scalars(Path(from_stage2.trainer.log_dir))
    assert s2["stage"] == [2.0]
    assert "train/loss_kd" in s2 and "train/loss_hint" not in s2


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    ("fitnet.yaml", ["--model.init_args.student_layers", "[relu4]"],
     ["ConvNet1D has no module 'relu4'", "Nearest module names: relu"]),
    ("at.yaml", ["--model.init_args.teacher_layers", "[relu1, conv9, relu3]"],
     ["has no module 'conv9'", "conv1"]),
    ("fsp.yaml", ["--model.init_args.student.init_args.width", "32",
                  "--model.init_args.student.init_args.groups", "1"],
     ["'relu1' [B, 32, 19]", "'relu1' [B, 64, 19]", "FSP matrix is 32x32 but the teacher's is 64x64",
      "needs its teacher layer's channel count"]),
    ("fsp.yaml", ["--model.init_args.student_pairs", "[[relu3, fc]]",
                  "--model.init_args.teacher_pairs", "[[relu3, fc]]"],
     ["'fc' [B, 10]", "need feature maps", "Tap convolutional layers"]),
    ("at.yaml", ["--model.init_args.student_layers", "[fc]", "--model.init_args.teacher_layers", "[fc]"],
     ["student layer 'fc' gives [B, 10], teacher layer 'fc' gives [B, 10]", "need feature maps"]),
    ("fsp.yaml", ["--model.init_args.stage1_epochs", "1"],
     ["stage1_epochs=1 (1 epochs) >= trainer.max_epochs=1", "stage 2"]),
    ("ab.yaml", ["--trainer.max_epochs", "3", "--model.init_args.stage1_epochs", "5"],
     ["stage1_epochs=5 (5 epochs) >= trainer.max_epochs=3"]),
    ("fitnet.yaml", ["--model.init_args.stage1_epochs", "1.5"], ["fraction of max_epochs"]),
    ("fitnet.yaml", ["--model.init_args.transfer_weight", "-1"], ["transfer_weight must be >= 0"]),
]


@pytest.mark.parametrize("config, extra, messages", BAD, ids=[m[0][:28] for *_, m in BAD])
def test_bad_input_gives_one_paragraph_error(config, extra, messages, mnist1d_teacher, tmp_path,
                                             monkeypatch, capsys):
    assert_mnist1d_config_refused(config, extra, messages, mnist1d_teacher, tmp_path, monkeypatch, capsys)


def test_fsp_channel_mismatch_on_cifar_resnets_names_both_shapes():
    from kd_lightning.models import resnet8x4

    with pytest.raises(KDConfigError, match=r"'layer1' \[B, 16, 32, 32\].*'layer1' \[B, 64, 32, 32\]"):
        FSP(student=resnet8(), teacher=resnet8x4(), student_pairs=[["relu", "layer1"]],
            input_shape=[3, 32, 32])


def test_input_shape_disagreeing_with_the_data_is_an_error():
    m = AttentionTransfer(student=resnet8(in_channels=1), teacher=resnet8(in_channels=1),
                          student_layers=["layer1", "layer2"], input_shape=[1, 16, 16])
    with pytest.raises(KDConfigError, match=r"input_shape is \[1, 16, 16\] but the data module "
                                            r"gives examples of shape \[1, 8, 8\]"):
        _trainer(limit_train_batches=1).fit(m, DistillDataModule("digits", batch_size=50))


# ---- bf16-mixed -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", list(CONFIG), ids=lambda c: c.__name__)
def test_bf16_mixed_runs_each_method_in_both_stages(cls, mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = [] if cls is AttentionTransfer else ["--model.init_args.stage1_epochs", "1"]
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d" / CONFIG[cls], *TINY,
                   "--trainer.max_epochs", "2", *stages, "--trainer.precision", "bf16-mixed",
                   "--model.init_args.teacher_checkpoint", mnist1d_teacher, "--data.train_subset", "100",
                   "--model.init_args.ce_weight", "0.1", "--model.init_args.kd_weight", "0.9"])
    assert cli.trainer.precision == "bf16-mixed"
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    assert all(math.isfinite(v) for v in scalars["train/loss"])
    if stages:
        assert scalars["stage"] == [1.0, 2.0]


@pytest.mark.ddp
def test_two_stage_fitnet_under_ddp_keeps_ranks_identical(mnist1d_teacher, tmp_path):
    """Stage 1 trains student + connector, stage 2 the student alone: under DDP (with the
    documented ddp_find_unused_parameters_true) both processes end with the same weights."""
    (r0, r1), _ = run_ddp(["fit", "--config", CONFIGS / "mnist1d/fitnet.yaml", *TINY,
                           "--trainer.max_epochs", "2", "--model.init_args.stage1_epochs", "1",
                           "--model.init_args.teacher_checkpoint", mnist1d_teacher,
                           "--data.train_subset", "400", "--data.batch_size", "50",
                           "--data.batches_per_step", "2", "--test_after_fit", "false"], tmp_path,
                          DUMP_WEIGHTS, strategy="ddp_find_unused_parameters_true")
    assert r0["step"] == r1["step"] == 8  # 2 epochs x 2 groups x 2 minibatches per rank
    assert r0["weights"] == r1["weights"]


def test_fsp_pairs_maps_of_one_size_unless_pooling_is_asked_for():
    from kd_lightning.models import resnet20

    with pytest.raises(KDConfigError, match="same spatial size.*pool: smaller"):
        FSP(student=ConvNet1D(width=64, groups=4), teacher=ConvNet1D(width=64), num_classes=10,
            student_pairs=[["relu1", "relu2"]], input_shape=[1, 40])
    m = FSP(student=resnet20(num_classes=10), teacher=resnet20(num_classes=10), num_classes=10,
            student_pairs=[["relu", "layer1"], ["layer2.0", "layer2"], ["layer3.0", "layer3"]],
            input_shape=[3, 32, 32])  # the first and last map of each stage, as Yim et al.
    assert m.pool is None
