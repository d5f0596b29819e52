"""Teacher runs: a re-run never replaces an earlier teacher, the student configs find the published
one at a fixed path, and a teacher file that cannot be read gives a reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, REPO, TINY, run_cli, run_cli_error


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    if (REPO / "data").exists():
        (tmp_path / "data").symlink_to(REPO / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _student_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}


def test_rerunning_the_teacher_config_keeps_the_teacher_the_students_load(workdir, capsys):
    teacher = ["fit", "--config", CONFIGS / "mnist1d/teacher.yaml", *TINY, "--test_after_fit", "false"]
    run_cli(teacher)
    published = workdir / "runs/mnist1d_teacher/checkpoints/best.ckpt"
    first = workdir / "runs/mnist1d_teacher/version_0/checkpoints"
    assert (first / "last.ckpt").is_file()  # the teacher run can be resumed
    assert published.read_bytes() == (first / "best.ckpt").read_bytes()
    before = {p: p.read_bytes() for p in (published, first / "best.ckpt", first / "last.ckpt")}
    capsys.readouterr()

    run_cli([*teacher, "--seed_everything", "1"])  # another teacher (another seed)
    second = workdir / "runs/mnist1d_teacher/version_1/checkpoints"
    assert (second / "best.ckpt").is_file() and (second / "last.ckpt").is_file()
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing replaced
    new, kept = _student_weights(second / "best.ckpt"), _student_weights(published)
    assert any(not torch.equal(new[k], kept[k]) for k in kept)
    err = capsys.readouterr().err
    assert "is kept from an earlier run" in err
    assert "version_1/checkpoints/best.ckpt runs/mnist1d_teacher/checkpoints/best.ckpt" in err  # cp A B

    # the student configs load the published teacher, by their default path
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/response.yaml", *TINY, "--test_after_fit", "false"])
    assert all(torch.equal(v, kept[k]) for k, v in cli.model.teacher.state_dict().items())


def test_a_redirected_teacher_run_publishes_in_its_own_folder_only(workdir):
    # the study trains its teacher with the logger's save_dir set to its cache folder
    run_cli(["fit", "--config", CONFIGS / "mnist1d/teacher_member.yaml", *TINY,
             "--seed_everything", "2", "--test_after_fit", "false",
             "--trainer.logger.init_args.save_dir", "cache"])
    published = workdir / "cache/mnist1d_teacher_member/seed2/checkpoints/best.ckpt"
    run = workdir / "cache/mnist1d_teacher_member/version_0/checkpoints/best.ckpt"
    assert published.read_bytes() == run.read_bytes()
    assert not (workdir / "runs").exists()


def test_a_teacher_run_that_fails_publishes_nothing(workdir):
    with pytest.raises(SystemExit):  # diverges: a nan loss stops the run
        run_cli(["fit", "--config", CONFIGS / "mnist1d/teacher.yaml", *TINY, "--test_after_fit", "false",
                 "--model.init_args.optimizer.init_args.lr", "1e30"])
    assert not (workdir / "runs/mnist1d_teacher/checkpoints").exists()


@pytest.mark.parametrize("content, reason", [
    (b"", r"is an empty file \(0 bytes\): it was not written completely"),
    (b"not a checkpoint\n", r"\(17 bytes\) is corrupt or truncated and cannot be read \(\w+: \S"),
], ids=["empty", "not-a-checkpoint"])
def test_an_unreadable_teacher_checkpoint_gives_its_reason(workdir, capsys, content, reason):
    (workdir / "teacher.ckpt").write_bytes(content)
    err = run_cli_error(["fit", "--config", CONFIGS / "mnist1d/response.yaml", *TINY,
                         "--model.init_args.teacher_checkpoint", "teacher.ckpt"], capsys)
    assert "teacher checkpoint 'teacher.ckpt'" in err
    assert re.search(reason, err), err
    assert not list(workdir.rglob("*.ckpt"))[1:]  # only the bad teacher file itself
