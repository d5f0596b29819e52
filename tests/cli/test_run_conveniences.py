"""The small things a run needs: own model classes beside the config, schedules that know the
run's length, training without a validation split, a progress line per epoch, test error counts."""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.training.progress import EpochSummary, format_duration
from tests.conftest import CONFIGS, TINY, run_cli, run_cli_error

STUDENT = CONFIGS / "mnist1d" / "student.yaml"
ONE_CYCLE = json.dumps({"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.01}})


@pytest.fixture
def cwd_not_on_path(tmp_path, monkeypatch):
    """Run in ``tmp_path`` with it (and the relative entry '') off ``sys.path``, as the
    ``kd-lightning`` console script starts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    return tmp_path


# ---- class_path from the working directory ---------------------------------------------------
def test_own_model_class_in_a_file_beside_the_config_is_importable(cwd_not_on_path):
    (cwd_not_on_path / "beside_config_net.py").write_text(
        "import torch\n\n"
        "class BesideNet(torch.nn.Module):\n"
        "    def __init__(self, num_classes: int = 10, hidden: int = 8):\n"
        "        super().__init__()\n"
        "        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, hidden),\n"
        "                                        torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))\n\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n")
    (cwd_not_on_path / "my_config.yaml").write_text(
        "model:\n  init_args:\n    student:\n      class_path: beside_config_net.BesideNet\n"
        "      init_args: {num_classes: 10, hidden: 12}\n")
    sys.modules.pop("beside_config_net", None)
    cli = run_cli(["fit", "--config", STUDENT, "--config", "my_config.yaml", *TINY])
    assert type(cli.model.student).__name__ == "BesideNet"
    assert cli.model.student.body[1].out_features == 12
    assert 0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1


@pytest.mark.parametrize("class_path, problem", [
    ("no_such_module.Net", "No module named 'no_such_module'"),
    ("kd_lightning.models.NoSuchNet", "module 'kd_lightning.models' has no attribute 'NoSuchNet'"),
])
def test_a_class_path_that_cannot_be_imported_is_one_short_error(class_path, problem, cwd_not_on_path, capsys):
    err = run_cli_error(["fit", "--config", STUDENT, *TINY, "--model.init_args.student", class_path], capsys)
    assert err.startswith(f"kd-lightning: error: cannot import class_path '{class_path}': {problem}.")
    assert "working directory is importable" in err
    assert "usage:" not in capsys.readouterr().err
    assert not list(cwd_not_on_path.rglob("*.ckpt"))


# ---- OneCycleLR's length from the trainer ----------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
def test_one_cycle_total_steps_is_the_number_of_optimizer_steps(k, cwd_not_on_path):
    # 100 examples in batches of 32: 4 optimizer steps per epoch (k minibatches per Lightning
    # step do not change that), 2 epochs
    cli = run_cli(["fit", "--config", STUDENT, *TINY, "--trainer.limit_train_batches", "1.0",
                   "--trainer.max_epochs", "2", "--data.train_subset", "100", "--data.batch_size", "32",
                   "--data.batches_per_step", str(k), "--model.init_args.lr_scheduler", ONE_CYCLE,
                   "--model.init_args.lr_scheduler_interval", "step", "--test_after_fit", "false"])
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.total_steps == 8
    assert scheduler.last_epoch == 8 and cli.trainer.global_step == 8  # the cycle was completed


def test_one_cycle_per_epoch_gets_the_number_of_epochs(cwd_not_on_path):
    cli = run_cli(["fit", "--config", STUDENT, *TINY, "--trainer.max_epochs", "3",
                   "--model.init_args.lr_scheduler", ONE_CYCLE, "--test_after_fit", "false"])
    assert cli.trainer.lr_scheduler_configs[0].scheduler.total_steps == 3


def test_a_too_short_one_cycle_is_refused_before_training(cwd_not_on_path, capsys):
    short = json.dumps({"class_path": "torch.optim.lr_scheduler.OneCycleLR",
                        "init_args": {"max_lr": 0.01, "total_steps": 5}})
    err = run_cli_error(["fit", "--config", STUDENT, *TINY, "--trainer.limit_train_batches", "1.0",
                         "--trainer.max_epochs", "2", "--data.train_subset", "100",
                         "--data.batch_size", "32", "--model.init_args.lr_scheduler", short,
                         "--model.init_args.lr_scheduler_interval", "step"], capsys)
    assert "OneCycleLR has total_steps=5 but this fit steps it 8 times (optimizer steps" in err
    assert "give at least 8" in err
    assert not list(cwd_not_on_path.rglob("*.ckpt"))


# ---- no validation split; progress line; error counts -------------------------------------------
def test_training_without_validation_split_is_quiet_and_tests_the_final_weights(cwd_not_on_path, caplog,
                                                                                capsys):
    # (the level of Lightning's own logger: a study or born-again run in the same process lowers it)
    with warnings.catch_warnings(record=True) as caught, \
            caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        warnings.simplefilter("always")
        cli = run_cli(["fit", "--config", STUDENT, *TINY, "--trainer.max_epochs", "2",
                       "--data.val_split", "0"])
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "val/acc" in m or "DataLoader" in m and "zero" in m], messages
    assert len(cli.datamodule.val_indices) == 0
    ckpt_dir = Path(cli.trainer.log_dir) / "checkpoints"
    best = torch.load(ckpt_dir / "best.ckpt", weights_only=True)
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert best["epoch"] == last["epoch"] == 1  # the final weights, kept as "best"
    assert all(torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items())
    metrics = cli.trainer.callback_metrics
    assert "val/acc" not in metrics and "test/acc" in metrics
    # the progress line of each epoch, without val/acc
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all("val/acc" not in line for line in lines)


def test_progress_line_per_epoch_and_test_error_counts(cwd_not_on_path, capsys, mnist1d_teacher):
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d" / "response.yaml", *TINY,
                   "--model.init_args.teacher_checkpoint", mnist1d_teacher, "--test_after_fit", "false"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 1, lines
    match = re.fullmatch(r"epoch 1/1  step 2  train/loss (\d+\.\d{4})  .*  val/acc (\d\.\d{4})  .*"
                         r"  elapsed (\d+):(\d\d)", lines[0])
    assert match, lines[0]
    metrics = cli.trainer.callback_metrics
    # one epoch: the epoch's mean loss is the logged window's mean
    assert float(match.group(1)) == pytest.approx(float(metrics["train/loss"]), abs=6e-5)
    assert EpochSummary in {type(cb) for cb in cli.trainer.callbacks}
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    # error counts, computed here independently over the tested examples (1 batch of 500)
    model = cli.model.eval()
    x, y, _ = next(iter(cli.datamodule.test_dataloader()))
    with torch.no_grad():
        student_errors = int((model.student(x).argmax(-1) != y).sum())
        teacher_errors = int((model.teacher(x).argmax(-1) != y).sum())
    assert metrics["test/errors"] == student_errors
    assert metrics["test/teacher_errors"] == teacher_errors
    assert metrics["test/acc"] == pytest.approx(1 - student_errors / len(y))


def test_no_progress_line_with_the_progress_bar_on(cwd_not_on_path):
    args = [a if a != "false" or TINY[i - 1] != "--trainer.enable_progress_bar" else "true"
            for i, a in enumerate(TINY)]
    cli = run_cli(["fit", "--config", STUDENT, *args, "--test_after_fit", "false"])
    assert not any(isinstance(cb, EpochSummary) for cb in cli.trainer.callbacks)


def test_format_duration():
    assert format_duration(5) == "0:05"
    assert format_duration(2 * 60 + 5.4) == "2:05"
    assert format_duration(47 * 60) == "47:00"
    assert format_duration(3600 + 61) == "1:01:01"


# ---- augmentation that does not fit digits -----------------------------------------------------
def test_crop_and_flip_is_refused_for_digits_with_jitter_suggested():
    for augment in (True, "crop_flip"):
        with pytest.raises(KDConfigError, match="a mirrored digit of digits is another symbol. Use augment=jitter"):
            DistillDataModule("digits", augment=augment)
    assert DistillDataModule("digits", augment="jitter").augment == "jitter"


@pytest.mark.slow
@pytest.mark.ddp
def test_test_errors_are_summed_over_ddp_ranks(tmp_path):
    """Two processes each test half of the 1000 MNIST-1D test examples; ``test/errors`` counts
    the misclassified examples of both halves."""
    import os
    import subprocess

    from kd_lightning.models import MLP
    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-m", "kd_lightning.cli", "fit", "--config", str(STUDENT), *TINY,
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.limit_test_batches", "1.0", "--data.eval_batch_size", "250"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    reported = {m.group(1): float(m.group(2))
                for m in re.finditer(r"(test/\w+)\s*│\s*([\d.]+)", out.stdout)}
    best = next(tmp_path.rglob("best.ckpt"))
    state = torch.load(best, weights_only=True)["state_dict"]
    student = MLP(input_dim=40, hidden_dims=[100, 100], num_classes=10)
    student.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    dm = DistillDataModule("mnist1d", root=str(tmp_path / "data"))
    dm.setup("test")
    x, y, _ = dm.test_dataset.get_batch(torch.arange(len(dm.test_dataset)))
    with torch.no_grad():
        errors = int((student.eval()(x).argmax(-1) != y).sum())
    assert len(y) == 1000
    assert reported["test/errors"] == errors
    assert reported["test/acc"] == pytest.approx(1 - errors / 1000, abs=1e-6)
