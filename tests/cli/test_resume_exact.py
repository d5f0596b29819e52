"""Kill a run with SIGKILL, resume it from ``last.ckpt``: the student equals the uninterrupted one.

Each run is the real ``kd-lightning`` CLI in a subprocess (``--trainer.deterministic true``); the
kill is a real SIGKILL at the start of a chosen training batch (tests/kill_helpers.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.deterministic", "true", "--seed_everything", "0"]


def _workdir(folder: Path) -> Path:
    """A run folder that sees the repository's data cache (when there is one)."""
    folder.mkdir(exist_ok=True)
    if (REPO / "data").exists():
        (folder / "data").symlink_to(REPO / "data", target_is_directory=True)
    return folder


def _fit(workdir: Path, args: list[str], kill_at: str | None = None, ckpt: Path | None = None,
         signal_name: str = "SIGKILL") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", KD_TEST_SIGNAL=signal_name)
    env.pop("KD_TEST_KILL_AT", None)
    if kill_at:
        env["KD_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "kd_lightning.cli", "fit", *map(str, args), *QUIET,
           "--trainer.callbacks+=tests.kill_helpers.KillAt"]
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)


def _last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def _best_score(ckpt: dict) -> float:
    """The best validation score the run's best-checkpoint callback has seen."""
    (score,) = [s["best_model_score"] for k, s in ckpt["callbacks"].items()
                if "ModelCheckpoint" in k and "val/acc" in k]
    return float(score)


def _killed_and_resumed_equals_uninterrupted(tmp_path: Path, args: list[str], kill_at: str,
                                             name: str) -> None:
    for d in ("a", "b"):
        _workdir(tmp_path / d)
    full = _fit(tmp_path / "a", args)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _fit(tmp_path / "b", args, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_b = tmp_path / "b" / "runs" / name / "version_0"
    resumed = _fit(tmp_path / "b", args, ckpt=run_b / "checkpoints" / "last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = _last(tmp_path / "a" / "runs" / name / "version_0")
    b = _last(run_b)  # the resumed run continues in its own version folder
    assert not (tmp_path / "b" / "runs" / name / "version_1").exists()
    assert b["epoch"] == a["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), f"{key} differs after resume"
    # the best score survives the resume, so `fit` tests the run's best checkpoint
    assert _best_score(b) == _best_score(a)


def test_response_kd_killed_mid_epoch_resumes_to_the_same_student(tmp_path, mnist1d_teacher):
    args = ["--config", CONFIGS / "mnist1d/response.yaml", "--model.init_args.teacher_checkpoint",
            mnist1d_teacher, "--data.train_subset", "200", "--data.batch_size", "20",
            "--data.batches_per_step", "1", "--trainer.max_epochs", "4",
            "--trainer.logger.init_args.name", "kd", "--test_after_fit", "false"]
    _killed_and_resumed_equals_uninterrupted(tmp_path, args, "2:3", "kd")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["1:2", "3:2"], ids=["in-stage-1", "in-stage-2"])
def test_fitnet_killed_in_either_stage_resumes_to_the_same_student(tmp_path, mnist1d_teacher,
                                                                    kill_at):
    args = ["--config", CONFIGS / "mnist1d/fitnet.yaml", "--model.init_args.teacher_checkpoint",
            mnist1d_teacher, "--data.train_subset", "200", "--data.batch_size", "20",
            "--data.batches_per_step", "1", "--trainer.max_epochs", "5",
            "--model.init_args.stage1_epochs", "2",
            "--trainer.logger.init_args.name", "fitnet", "--test_after_fit", "false"]
    _killed_and_resumed_equals_uninterrupted(tmp_path, args, kill_at, "fitnet")


@pytest.mark.slow
def test_mutual_distillation_killed_resumes_to_the_same_student(tmp_path):
    args = ["--config", CONFIGS / "mnist1d/mutual_learnable.yaml", "--data.train_subset", "200",
            "--data.batch_size", "20", "--data.batches_per_step", "1", "--trainer.max_epochs", "4",
            "--trainer.logger.init_args.name", "mutual", "--test_after_fit", "false"]
    _killed_and_resumed_equals_uninterrupted(tmp_path, args, "2:3", "mutual")


@pytest.mark.slow
def test_grouped_minibatches_killed_resume_to_the_same_student(tmp_path, mnist1d_teacher):
    args = ["--config", CONFIGS / "mnist1d/response.yaml", "--model.init_args.teacher_checkpoint",
            mnist1d_teacher, "--data.train_subset", "400", "--data.batch_size", "10",
            "--data.batches_per_step", "10", "--trainer.max_epochs", "4",
            "--trainer.logger.init_args.name", "grouped", "--test_after_fit", "false"]
    _killed_and_resumed_equals_uninterrupted(tmp_path, args, "2:1", "grouped")


def test_sigterm_saves_a_resumable_checkpoint_and_exits_non_zero(tmp_path, mnist1d_teacher):
    args = ["--config", CONFIGS / "mnist1d/response.yaml", "--model.init_args.teacher_checkpoint",
            mnist1d_teacher, "--data.train_subset", "200", "--data.batch_size", "20",
            "--data.batches_per_step", "1", "--trainer.max_epochs", "3",
            "--trainer.logger.init_args.name", "kd", "--test_after_fit", "false"]
    _workdir(tmp_path)
    stopped = _fit(tmp_path, args, kill_at="1:4", signal_name="SIGTERM")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    ckpt = tmp_path / "runs" / "kd" / "version_0" / "checkpoints" / "interrupted.ckpt"
    assert ckpt.is_file() and "interrupted by SIGTERM" in stopped.stderr
    assert "--ckpt_path runs/kd/version_0/checkpoints/interrupted.ckpt" in stopped.stderr
    state = torch.load(ckpt, weights_only=True)
    # 10 steps per epoch; the signal arrives before batch 4 of epoch 1, Lightning stops after it
    assert state["epoch"] == 1 and state["global_step"] == 15
    resumed = _fit(tmp_path, args, ckpt=ckpt)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "runs" / "kd" / "version_0" / "checkpoints" / "last.ckpt",
                      weights_only=True)["epoch"] == 2
