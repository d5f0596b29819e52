"""End-to-end tests that drive the real ``kd-lightning`` CLI on tiny configurations."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import (CONFIGS, DUMP_WEIGHTS, TINY, prepare_config, run_cli, run_cli_error, run_cli_in,
                            run_cli_subprocess, run_ddp, tb_scalars, write_cifar, write_mnist_idx)


# every `kd-lightning fit` config (the born-again config is kd-lightning-born-again's: it gets its
# teacher per generation, tests/study/test_born_again.py runs it)
# (the MNIST-1D configs get their default fit, with these checks, in tests/methods/test_conformance.py)
ALL_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("*/*.yaml")
                     if p.parent.name not in ("studies", "mnist1d"))


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_config_fits_end_to_end(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare_config(CONFIGS / config, tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / config, *TINY, "--data.batch_size", "8",
                   "--data.eval_batch_size", "16"])
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= float(metrics["test/acc"]) <= 1.0
    log_dir = Path(cli.trainer.log_dir)
    scalars = tb_scalars(log_dir)
    assert "train/loss" in scalars and all(map(math.isfinite, scalars["train/loss"]))
    if len(cli.datamodule.val_indices):  # (the MNIST configs train on all 60,000 images, as the paper)
        assert "val/acc" in scalars
    assert (log_dir / "config.yaml").is_file()
    saved = json.loads((log_dir / "train_subset.json").read_text())
    assert saved["num_examples"] == len(cli.datamodule.train_indices)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A real (briefly trained) MNIST-1D teacher checkpoint written by `kd-lightning fit`."""
    work = tmp_path_factory.mktemp("teacher")
    run_cli_in(work, ["fit", "--config", CONFIGS / "mnist1d/teacher.yaml", *TINY,
                      "--trainer.limit_train_batches", "5"])
    ckpt = work / "runs/mnist1d_teacher/checkpoints/best.ckpt"
    assert ckpt.is_file()
    return ckpt


def _response_args(ckpt: Path, *extra: str) -> list:
    return ["fit", "--config", CONFIGS / "mnist1d/response.yaml", *TINY,
            "--model.init_args.teacher_checkpoint", ckpt, *extra]


def test_response_kd_loads_lightning_teacher_and_keeps_it_frozen(teacher_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = torch.load(teacher_ckpt, weights_only=True)["state_dict"]
    cli = run_cli(_response_args(teacher_ckpt, "--trainer.limit_train_batches", "4"))
    model = cli.model
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, state[f"student.{key}"]), key  # loaded and unchanged by training
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    opt_params = {id(p) for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.student.parameters()}
    assert "test/teacher_acc" in cli.trainer.callback_metrics
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    for key in ("train/loss_ce", "train/loss_kd", "train/acc", "val/acc", "lr-Adam"):
        assert key in scalars, key



def test_shipped_config_trains_with_several_minibatches_per_step(teacher_ckpt, tmp_path, monkeypatch):
    """configs/mnist1d/response.yaml as shipped (batches_per_step 10): counts optimizer steps,
    logs, checkpoints and tests like a one-minibatch-per-step run."""
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/response.yaml", "--trainer.max_epochs", "2",
                   "--data.train_subset", "300", "--data.batch_size", "50",
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                   "--model.init_args.teacher_checkpoint", teacher_ckpt])
    assert cli.datamodule.batches_per_step == 10
    assert cli.trainer.global_step == 12  # 6 minibatches (one group) per epoch, 2 epochs
    assert "test/acc" in cli.trainer.callback_metrics
    ckpt_dir = Path(cli.trainer.log_dir) / "checkpoints"
    assert (ckpt_dir / "best.ckpt").is_file() and (ckpt_dir / "last.ckpt").is_file()
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 12
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    assert len(scalars["train/loss_kd"]) == 1 and len(scalars["val/acc"]) == 2

def test_hparams_tab_shows_final_validation_accuracy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                   "--trainer.max_epochs", "2", "--test_after_fit", "false"])
    hp = tb_scalars(Path(cli.trainer.log_dir))["hp_metric"]
    assert hp[-1] == pytest.approx(float(cli.trainer.callback_metrics["val/acc"]))
    assert hp[-1] >= 0  # not the -1 placeholder


def test_resume_continues_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY, "--test_after_fit", "false"]
    cli = run_cli(args)
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert cli.trainer.current_epoch == 1
    cli2 = run_cli(args + ["--trainer.max_epochs", "3", "--ckpt_path", last])
    assert cli2.trainer.current_epoch == 3
    assert cli2.trainer.global_step == 6  # 2 steps per epoch, 3 epochs in all
    last2 = Path(cli2.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last2, weights_only=True)["epoch"] == 2  # the latest epoch, not the best


def test_test_and_predict_subcommands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY, "--test_after_fit", "false"])
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    tcli = run_cli(["test", "--config", CONFIGS / "mnist1d/student.yaml", "--ckpt_path", last,
                    "--trainer.enable_progress_bar", "false"])
    assert 0 <= float(tcli.trainer.callback_metrics["test/acc"]) <= 1
    from kd_lightning.cli import cli_main

    pcli = cli_main(["predict", "--config", str(CONFIGS / "mnist1d/student.yaml"), "--ckpt_path",
                     str(last), "--trainer.limit_predict_batches", "1",
                     "--trainer.enable_progress_bar", "false"])
    assert pcli is not None


@pytest.mark.parametrize("student", [
    ["--model.init_args.student", "kd_lightning.models.TorchvisionModel",
     "--model.init_args.student.init_args.name", "resnet18"],
    ["--model.init_args.student", "torchvision.models.MobileNetV2"],
])
def test_torchvision_classifier_as_student_and_teacher(student, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path / "data", 10, n_train=60, n_test=20)
    from torchvision.models import resnet18

    torch.save(resnet18(num_classes=10).state_dict(), tmp_path / "tv_teacher.pt")
    cli = run_cli(["fit", "--config", CONFIGS / "cifar10/response_resnet56_resnet20.yaml", *TINY,
                   *student, "--model.init_args.student.init_args.num_classes", "10",
                   "--model.init_args.teacher", "torchvision.models.ResNet",
                   "--model.init_args.teacher.init_args.block", "torchvision.models.resnet.BasicBlock",
                   "--model.init_args.teacher.init_args.layers", "[2, 2, 2, 2]",
                   "--model.init_args.teacher.init_args.num_classes", "10",
                   "--model.init_args.teacher_checkpoint", tmp_path / "tv_teacher.pt",
                   "--data.batch_size", "8", "--data.val_split", "20"])
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1


# ---- bad input: one clear paragraph, exit status 2 ------------------------------------------
BAD = [
    (["--data.dataset", "imagenet"], "unknown dataset 'imagenet'. Valid names: cifar10"),
    (["--data.train_subset", "5000"], "larger than the training set"),
    (["--data.train_subset", "3590"], "has only"),
    (["--data.train_subset", "5"], "smaller than the number of classes"),
    (["--model.init_args.temperature", "0"], "temperature must be > 0"),
    (["--model.init_args.kd_weight", "-0.5"], "kd_weight must be >= 0"),
    (["--model.init_args.teacher_checkpoint", "missing/teacher.ckpt"],
     "teacher checkpoint 'missing/teacher.ckpt' does not exist"),
    (["--model.init_args.teacher.init_args.width", "32"],
     "first mismatching key 'conv1.weight' has shape (64, 1, 5) in the checkpoint but (32, 1, 5)"),
    (["--model.init_args.student.init_args.num_classes", "7"], "class counts disagree"),
    (["--data.dataset", "cifar10", "--data.root", "nowhere"], "cifar-10-batches-py"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_gives_one_paragraph_error(extra, message, teacher_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = _response_args(teacher_ckpt)
    err = run_cli_error(args + extra, capsys)
    assert message in err
    # nothing was trained or written before the error
    assert not list(tmp_path.rglob("*.ckpt"))


# ---- precision and multi-process, through the console script in a subprocess ----------------
def test_bf16_mixed_runs_response_kd(teacher_ckpt, tmp_path):
    out = run_cli_subprocess(_response_args(teacher_ckpt, "--trainer.precision", "bf16-mixed"), tmp_path,
                             timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/acc" in out.stdout


DUMP_CALLBACK = '''
import json, os
from pytorch_lightning import Callback

class DumpSubset(Callback):
    def on_train_start(self, trainer, pl_module):
        dm = trainer.datamodule
        path = os.path.join(os.getcwd(), f"rank{trainer.global_rank}.json")
        with open(path, "w") as f:
            json.dump({"world": trainer.world_size, "indices": dm.train_indices.tolist(),
                       "cache": pl_module.frozen_teacher.cache.active}, f)
'''


@pytest.mark.ddp
def test_ddp_two_cpu_processes_train_on_the_same_subset(teacher_ckpt, tmp_path):
    (r0, r1), out = run_ddp(_response_args(teacher_ckpt, "--data.train_subset", "200",
                                           "--data.subset_seed", "3"), tmp_path, DUMP_CALLBACK)
    assert r0["world"] == r1["world"] == 2
    assert r0["indices"] == r1["indices"] and len(r0["indices"]) == 200
    assert "test/acc" in out.stdout


@pytest.mark.ddp
def test_ddp_with_several_minibatches_per_step_keeps_ranks_in_sync(teacher_ckpt, tmp_path):
    """batches_per_step > 1 under DDP: every minibatch's gradient is all-reduced, so both ranks
    (which see different shards) end with the same student and count the same optimizer steps."""
    (r0, r1), _ = run_ddp(_response_args(
        teacher_ckpt, "--data.train_subset", "600", "--data.batch_size", "50",
        "--data.batches_per_step", "3", "--trainer.limit_train_batches", "2"), tmp_path, DUMP_WEIGHTS)
    assert r0["step"] == r1["step"] == 6  # 2 groups of 3 minibatches
    assert r0["weights"] == r1["weights"]


FASHION = sorted((CONFIGS / "fashion_mnist").glob("*.yaml"))


@pytest.mark.parametrize("config", FASHION, ids=[p.name for p in FASHION])
def test_fashion_mnist_configs_fit_end_to_end(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mnist_idx(tmp_path / "data", "FashionMNIST", n_train=300, n_test=40)
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    extra = []
    if init.get("teacher_checkpoint"):
        module, name = init["teacher"]["class_path"].rsplit(".", 1)
        teacher = getattr(importlib.import_module(module), name)(**init["teacher"].get("init_args", {}))
        torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
        extra = ["--model.init_args.teacher_checkpoint", tmp_path / "teacher.pt"]
    cli = run_cli(["fit", "--config", config, *TINY, "--data.batch_size", "8",
                   "--data.eval_batch_size", "16", *extra])
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1
    scalars = tb_scalars(Path(cli.trainer.log_dir))
    assert all(map(math.isfinite, scalars["train/loss"])) and "val/acc" in scalars
