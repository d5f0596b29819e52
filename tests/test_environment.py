"""What a run records about the machine it ran on, and both CLIs refusing abbreviated options."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning
import torch

from tests.conftest import CONFIGS, TINY, run_cli


def test_describe_names_versions_kernels_threads_and_overrides(monkeypatch):
    from kd_lightning.environment import describe, summary

    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    env = describe()
    assert env["torch"] == torch.__version__
    assert env["pytorch_lightning"] == pytorch_lightning.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads() and env["cpu"]
    assert env["overrides"] == {"MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                **({"OMP_NUM_THREADS": v} if (v := __import__("os").environ.get(
                                    "OMP_NUM_THREADS")) else {})}
    line = summary({**env, "threads": 1, "accelerator": "cpu", "devices": 1})
    assert line.startswith(f"torch {torch.__version__}, pytorch-lightning {pytorch_lightning.__version__}")
    assert f"({env['cpu_capability']} kernels, MKL_ENABLE_INSTRUCTIONS=AVX2" in line
    assert line.endswith(", 1 thread; cpu")


def test_a_fit_run_writes_its_environment_into_its_folder_and_a_resume_appends(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", torch.backends.cpu.get_cpu_capability().lower())
    cli = run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY,
                   "--trainer.logger.init_args.save_dir", tmp_path / "runs"])
    path = tmp_path / "runs" / "mnist1d_student" / "version_0" / "environment.json"
    assert cli.trainer.log_dir == str(path.parent)
    (env,) = json.loads(path.read_text())
    assert env["torch"] == torch.__version__ and env["cpu_capability"]
    assert env["threads"] == torch.get_num_threads()
    assert (env["accelerator"], env["devices"], env["num_nodes"], env["gpu"]) == ("cpu", 1, 1, None)
    assert env["overrides"]["ATEN_CPU_CAPABILITY"] == torch.backends.cpu.get_cpu_capability().lower()
    # resumed in the same folder: a second record, the first kept
    run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY, "--trainer.max_epochs", "2",
             "--trainer.logger.init_args.save_dir", tmp_path / "runs",
             "--ckpt_path", path.parent / "checkpoints" / "last.ckpt"])
    records = json.loads(path.read_text())
    assert len(records) == 2 and records[0] == env


@pytest.mark.parametrize("typo", ["--trainer.max_epoch", "--trainer.max_e", "--test_after"])
def test_kd_lightning_refuses_abbreviated_options(typo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--config", CONFIGS / "mnist1d/student.yaml", *TINY, typo, "false"
                 if typo == "--test_after" else "3"])
    assert exc.value.code == 2
    assert f"unrecognized arguments: {typo}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_a_study_run_of_an_abbreviated_option_is_refused_before_it_runs(tmp_path):
    from kd_lightning import KDConfigError, jobs

    with pytest.raises(KDConfigError, match="max_epoch"):
        jobs.parse_run(str(CONFIGS / "mnist1d/student.yaml"), ["--trainer.max_epoch", "3"], "here")


@pytest.mark.parametrize("typo", [["--work", "2"], ["--no-prog"], ["--teacher", "x"]])
def test_kd_lightning_study_refuses_abbreviated_options(typo, tmp_path, capsys):
    from kd_lightning.study import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tmp_path / "missing.yaml"), *typo])
    assert exc.value.code == 2
    assert typo[0] in capsys.readouterr().err
