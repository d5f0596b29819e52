"""Failures of a run, each with one clear message: divergence, a bad checkpoint path, an unwritable
log folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, TINY, run_cli_error


def _finite_checkpoints(folder: Path) -> list[Path]:
    found = sorted(folder.rglob("*.ckpt"))
    for path in found:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()), path
    return found


@pytest.mark.parametrize("config", ["mnist1d/student.yaml", "mnist1d/fitnet.yaml",
                                    "mnist1d/relation.yaml"])
def test_diverged_training_fails_and_leaves_no_diverged_checkpoint(config, tmp_path, monkeypatch,
                                                                    capsys, mnist1d_teacher):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", CONFIGS / config, *TINY, "--trainer.max_epochs", "3",
            "--trainer.limit_train_batches", "3", "--optimizer", "torch.optim.SGD",
            "--optimizer.lr", "1e12", "--trainer.log_every_n_steps", "1000"]
    if "student" not in config:
        args += ["--model.init_args.teacher_checkpoint", mnist1d_teacher]
    message = run_cli_error(args, capsys)
    assert "training diverged" in message and "nan or inf" in message
    assert "global step" in message
    _finite_checkpoints(tmp_path / "runs")


@pytest.mark.parametrize("case", ["missing", "truncated", "not-a-checkpoint"])
def test_bad_ckpt_path_is_one_clear_message(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "last.ckpt"
    if case == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    elif case == "not-a-checkpoint":
        ckpt.write_text("hello")
    message = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                             "--ckpt_path", ckpt], capsys)
    assert "--ckpt_path" in message and str(ckpt) in message
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_unwritable_log_folder_is_one_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")  # a folder cannot be made below a file, even by root
    message = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                             "--trainer.logger.init_args.save_dir", tmp_path / "file" / "runs"],
                            capsys)
    assert "log folder" in message and "save_dir" in message
