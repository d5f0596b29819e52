"""VID, FT, CRD, OFD and ReviewKD, the methods that train auxiliary modules beside the student:
gradients reach the student and those modules never the teacher, each config runs through the CLI
in bf16 and under DDP, bad input is refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning.methods import CRD, OFD, VID, FactorTransfer, ReviewKD
from kd_lightning.models import ConvNet1D
from tests.conftest import CONFIGS, TINY, assert_mnist1d_config_refused, run_cli, run_ddp, tb_scalars


LAYERS3 = ["relu1", "relu2", "relu3"]
CONFIG = {VID: "vid.yaml", FactorTransfer: "ft.yaml", CRD: "crd.yaml", OFD: "ofd.yaml",
          ReviewKD: "reviewkd.yaml"}
TERM = {VID: "loss_vid", FactorTransfer: "loss_ft", CRD: "loss_crd", OFD: "loss_ofd",
        ReviewKD: "loss_review"}


def _trainer(**kw) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kw})


def _at_epoch(module, epoch: int, max_epochs: int = 10) -> None:
    """Attach a trainer whose current epoch is ``epoch`` (for stage and warm-up checks)."""
    trainer = _trainer(max_epochs=max_epochs)
    trainer.fit_loop.epoch_progress.current.completed = epoch
    module.trainer = trainer


def _nets():
    torch.manual_seed(1)
    return ConvNet1D(width=16), ConvNet1D(width=32)


def _manual_maps(net: ConvNet1D, x: torch.Tensor):
    """Pre- and post-ReLU outputs of the three conv layers, computed step by step."""
    pre, post, h = [], [], x
    for conv in (net.conv1, net.conv2, net.conv3):
        z = conv(h)
        h = torch.relu(z)
        pre.append(z)
        post.append(h)
    return pre, post


def _make(cls, **kw):
    student, teacher = _nets()
    layers = {VID: {"student_layers": LAYERS3}, FactorTransfer: {"student_layer": "relu3"},
              CRD: {"num_data": 60, "num_negatives": 7},
              OFD: {"student_layers": LAYERS3, "margin_source": "data"},
              ReviewKD: {"student_layers": LAYERS3}}[cls]
    m = cls(student=student, teacher=teacher, num_classes=10, input_shape=[1, 40], **{**layers, **kw})
    if cls is OFD:
        torch.manual_seed(2)
        for margin in m.margins:  # margins measured from data elsewhere; any non-positive values here
            margin.copy_(-torch.rand_like(margin))
    if cls is CRD:
        m.bank.set_negative_pool(torch.arange(60), torch.arange(60) % 10)
    return m.train()


def _batch(n: int = 6):
    torch.manual_seed(3)
    idx = torch.tensor([3, 10, 17, 22, 41, 5, 58, 30][:n])
    return torch.randn(n, 1, 40), idx % 10, idx


# ---- gradients ------------------------------------------------------------------------------
AUX = {VID: "regressors", FactorTransfer: "translator", CRD: "embed_s", OFD: "connectors", ReviewKD: "abfs"}


@pytest.mark.parametrize("cls", list(CONFIG), ids=lambda c: c.__name__)
def test_gradients_reach_student_and_auxiliary_modules_never_teacher(cls):
    m = _make(cls, **({"stage1_epochs": 1} if cls is FactorTransfer else {}))
    if cls is FactorTransfer:
        _at_epoch(m, 1)  # stage 2
    x, y, idx = _batch()
    loss = m.training_step((x, y, idx), 0)
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters()) and not m.teacher.training
    assert m.student.conv1.weight.grad.abs().sum() > 0
    aux = getattr(m, AUX[cls])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aux.parameters())
    if cls is CRD:
        assert m.embed_t.linear.weight.grad.abs().sum() > 0  # the teacher's head learns too
    if cls is FactorTransfer:  # the paraphraser is frozen in stage 2
        assert all(p.grad is None for p in m.paraphraser.parameters())
    learnable = {id(p) for p in m.learnable_parameters()}
    assert {id(p) for p in aux.parameters()} <= learnable
    assert not learnable & {id(p) for p in m.teacher.parameters()}


# ---- CLI end to end, bf16 ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", list(CONFIG), ids=lambda c: c.__name__)
def test_cli_bf16_mixed_runs_each_method_with_finite_losses(cls, mnist1d_teacher, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = ["--model.init_args.stage1_epochs", "1"] if cls is FactorTransfer else []
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d" / CONFIG[cls], *TINY, "--trainer.max_epochs", "2",
                   *stages, "--trainer.precision", "bf16-mixed", "--model.init_args.teacher_checkpoint",
                   mnist1d_teacher, "--data.train_subset", "100", "--data.batch_size", "25"])
    assert isinstance(cli.model, cls) and cli.trainer.precision == "bf16-mixed"
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    assert all(math.isfinite(v) for v in scalars["train/loss"])
    assert all(math.isfinite(v) for v in scalars[f"train/{TERM[cls]}"]) and "train/loss_ce" in scalars
    if stages:
        assert scalars["stage"] == [1.0, 2.0] and "train/loss_rec" in scalars


# ---- bad input --------------------------------------------------------------------------------
BAD = [
    ("vid.yaml", ["--model.init_args.student_layers", "[fc]", "--model.init_args.teacher_layers", "[relu3]"],
     ["VID: student layer 'fc' gives [B, 10] but teacher layer 'relu3' gives [B, 64, 5]", "same kind"]),
    ("vid.yaml", ["--model.init_args.mid_channels", "0"], ["VID: mid_channels must be a positive integer"]),
    ("ft.yaml", ["--model.init_args.teacher_layer", "fc"],
     ["FactorTransfer: student layer 'relu3' gives [B, 64, 5] and teacher layer 'fc' gives [B, 10]",
      "must be feature maps"]),
    ("ft.yaml", ["--model.init_args.paraphrase_rate", "0"], ["paraphrase_rate k must be > 0"]),
    ("ft.yaml", ["--model.init_args.reconstruction_p", "3"], ["reconstruction_p must be 2"]),
    ("crd.yaml", ["--model.init_args.num_negatives", "0"], ["CRD: num_negatives must be a positive integer"]),
    ("crd.yaml", ["--model.init_args.bank_momentum", "1.0"], ["bank_momentum must be in [0, 1)"]),
    ("crd.yaml", ["--model.init_args.nce_temperature", "0"], ["nce_temperature must be > 0"]),
    ("crd.yaml", ["--model.init_args.num_data", "500"],
     ["memory bank has 500 rows (num_data) but the data module's training source has 4000"]),
    ("ofd.yaml", ["--model.init_args.margin_source", "bn"],
     ["no batch norm of the teacher (ConvNet1D) feeds the tensor before teacher layer 'relu1'",
      "margin_source: data"]),
    ("ofd.yaml", ["--model.init_args.margin_source", "mean"], ["margin_source must be 'bn'"]),
    ("ofd.yaml", ["--model.init_args.stage_weights", "[1.0, 1.0]"], ["one weight >= 0 per layer (3)"]),
    ("reviewkd.yaml", ["--model.init_args.warmup_epochs", "-1"], ["ReviewKD: warmup_epochs must be an integer >= 0"]),
    ("reviewkd.yaml", ["--model.init_args.student_pre_activation", "[false, true]"],
     ["student_pre_activation must be one bool or one per layer (3)"]),
    ("reviewkd.yaml", ["--model.init_args.teacher_layers", "[relu1, relu2]"],
     ["ReviewKD needs one teacher layer per student layer"]),
]


@pytest.mark.parametrize("config, extra, messages", BAD, ids=[f"{c[:-5]}-{m[0][:30]}" for c, _, m in BAD])
def test_bad_input_gives_one_paragraph_error(config, extra, messages, mnist1d_teacher, tmp_path,
                                             monkeypatch, capsys):
    assert_mnist1d_config_refused(config, extra, messages, mnist1d_teacher, tmp_path, monkeypatch, capsys)


# ---- DDP ----------------------------------------------------------------------------------------
DUMP_STATE = '''
import hashlib, json, os
from pytorch_lightning import Callback


class DumpState(Callback):
    def on_train_end(self, trainer, pl_module):
        def digest(items):
            h = hashlib.sha1()
            for _, v in sorted(items):
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()
        state = [(k, v) for k, v in pl_module.state_dict().items() if not k.startswith("teacher.")]
        with open(os.path.join(os.getcwd(), f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"world": trainer.world_size, "steps": trainer.global_step,
                       "broadcast_buffers": trainer.strategy.model.broadcast_buffers,
                       "params": digest(pl_module.named_parameters()),
                       "state": digest(state), "keys": sorted(k for k, _ in state),
                       "bank": digest([(k, v) for k, v in state if k.startswith("bank.")])}, f)
'''


def _ddp(config: str, teacher: Path, tmp_path: Path, strategy: str, *extra: str) -> dict:
    (r0, r1), _ = run_ddp(["fit", "--config", CONFIGS / "mnist1d" / config, *TINY,
                           "--trainer.limit_train_batches", "3", "--model.init_args.teacher_checkpoint",
                           teacher, "--data.train_subset", "200", "--data.batch_size", "20",
                           "--test_after_fit", "false", *extra], tmp_path, DUMP_STATE, strategy=strategy,
                          timeout=400)
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"]
    assert r0["params"] == r1["params"]  # identical weights (student and auxiliary modules)
    assert r0["state"] == r1["state"]  # and identical buffers
    return r0


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("cls, strategy, extra", [
    (VID, "ddp", []),
    (FactorTransfer, "ddp_find_unused_parameters_true",
     ["--trainer.max_epochs", "2", "--model.init_args.stage1_epochs", "1"]),
    (OFD, "ddp", []),
    (ReviewKD, "ddp", []),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_ddp_two_cpu_processes_end_identical(cls, strategy, extra, mnist1d_teacher, tmp_path):
    r0 = _ddp(CONFIG[cls], mnist1d_teacher, tmp_path, strategy, *extra)
    assert r0["steps"] == 3 * (2 if cls is FactorTransfer else 1)
