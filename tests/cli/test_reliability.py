"""Failures of a run, each with one clear message: divergence, a bad checkpoint path (missing,
truncated, of another network, a raw pickle, one that would run code), networks that do not fit the
data, an unwritable log folder -- each refused before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, TINY, run_cli_error, run_cli_in


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


# ---- checkpoints that cannot be used, refused before anything is written --------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """The folder of one short run of configs/mnist1d/teacher.yaml (a Supervised ConvNet1D)."""
    folder = tmp_path_factory.mktemp("teacher_run")
    run_cli_in(folder, ["fit", "--config", CONFIGS / "mnist1d/teacher.yaml", *TINY, "--test_after_fit", "false"])
    return folder


def _nothing_written(runs: Path) -> bool:
    """No run folder, config, event file or checkpoint under ``runs``."""
    return not runs.exists() or not [p for p in runs.rglob("*") if p.is_file() or p.name.startswith("version_")]


@pytest.mark.parametrize("case", ["teacher-for-response-kd", "student-of-another-width",
                                  "student-of-another-width-test"])
def test_ckpt_path_of_another_network_is_refused_before_anything_is_written(case, teacher_run, tmp_path,
                                                                            monkeypatch, capsys):
    teacher_ckpt = teacher_run / "runs/mnist1d_teacher/version_0/checkpoints/last.ckpt"
    monkeypatch.chdir(tmp_path)
    if case == "teacher-for-response-kd":  # the teacher's own checkpoint given to a student's fit
        args = ["fit", "--config", CONFIGS / "mnist1d/response.yaml",
                "--model.init_args.teacher_checkpoint", teacher_ckpt]
        shapes = "first mismatching key 'student.fc.weight' has shape (10, 320) in the checkpoint but (10, 100)"
    else:  # a teacher of width 32 resumed from (or tested with) the width-64 teacher's checkpoint
        args = ["test" if case.endswith("test") else "fit", "--config", CONFIGS / "mnist1d/teacher.yaml",
                "--model.init_args.student.init_args.width", "32"]
        shapes = "first mismatching key 'student.conv1.weight' has shape (64, 1, 5) in the checkpoint but (32, 1, 5)"
    message = run_cli_error([*args, *TINY, "--ckpt_path", teacher_ckpt], capsys)
    assert f"--ckpt_path {teacher_ckpt} holds the weights of another network" in message
    assert shapes in message
    if case == "teacher-for-response-kd":
        assert "unexpected keys in the checkpoint: 6 ('student.conv1.weight' (64, 1, 5)" in message
        assert "written by kd_lightning.methods.Supervised" in message
        assert "model.init_args.teacher_checkpoint" in message
    assert _nothing_written(tmp_path / "runs")


def test_a_ckpt_path_that_would_run_code_is_refused_with_the_teacher_paths_message(tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "code_ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"student.fc.weight": torch.zeros(2, 2)}, "payload": RunsCode()}, ckpt)
    message = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                             "--ckpt_path", ckpt], capsys)
    assert f"--ckpt_path {ckpt} holds a Python object of type posix.system, which is not loaded" in message
    assert "weights_only=True" in message
    assert not marker.exists()
    assert _nothing_written(tmp_path / "runs")


def test_a_raw_pickle_as_ckpt_path_is_named_not_a_torch_save_checkpoint(tmp_path, monkeypatch, capsys):
    import pickle

    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "weights.pkl"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": {"student.fc.weight": torch.zeros(2, 2)}}, f)
    message = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                             "--ckpt_path", ckpt], capsys)
    assert f"--ckpt_path {ckpt} is a raw pickle (pickle.dump), not a checkpoint written by torch.save" in message
    assert _nothing_written(tmp_path / "runs")


@pytest.mark.parametrize("case", ["class-counts", "input-shape"])
def test_networks_that_do_not_fit_the_data_are_refused_before_the_run_folder_exists(case, tmp_path,
                                                                                    monkeypatch, capsys):
    from kd_lightning.models import ConvNet1D

    monkeypatch.chdir(tmp_path)
    torch.save(ConvNet1D(num_classes=5, width=64).state_dict(), tmp_path / "teacher5.pt")
    torch.save(ConvNet1D(num_classes=10, width=64).state_dict(), tmp_path / "teacher10.pt")
    if case == "class-counts":  # a 5-class teacher on 10-class data
        extra = ["--model.init_args.teacher_checkpoint", "teacher5.pt",
                 "--model.init_args.teacher.init_args.num_classes", "5"]
        expected = "class counts disagree (student=10, teacher=5, data=10"
    else:  # a student for 30 inputs on MNIST-1D's 40
        extra = ["--model.init_args.teacher_checkpoint", "teacher10.pt",
                 "--model.init_args.student.init_args.input_dim", "30"]
        expected = "the student (MLP) cannot process inputs of shape (2, 1, 40)"
    message = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/response.yaml", *TINY, *extra], capsys)
    assert expected in message
    assert _nothing_written(tmp_path / "runs")  # no version_0/, config.yaml, train_subset.json, events
