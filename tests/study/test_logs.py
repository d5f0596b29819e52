"""A job's log is written as the job runs: a process killed mid-run leaves its log, with every
line written up to the kill, at the path the study's results name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pytorch_lightning.callbacks import Callback

from kd_lightning import jobs
from tests.conftest import CONFIGS, REPO, TINY



class PrintEpoch(Callback):
    """Prints a line after every training epoch (as a researcher's callback or model may)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        print(f"printed after epoch {trainer.current_epoch + 1}")


#: two epochs of the tiny student; KD_TEST_KILL_AT=1:0 kills it at the second epoch's first batch
CALLBACKS = ["--trainer.callbacks+=tests.study.test_logs.PrintEpoch",
             "--trainer.callbacks+=tests.kill_helpers.KillAt"]
ARGS = ["fit", "--config", str(CONFIGS / "mnist1d/student.yaml"), *TINY, "--trainer.max_epochs", "2",
        *CALLBACKS, "--test_after_fit", "false"]


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "KD_TEST_KILL_AT": "1:0", **extra}


def assert_log_up_to_the_kill(log: Path) -> None:
    text = log.read_text()
    assert "fit --config" in text.splitlines()[0]  # the command, first
    assert "printed after epoch 1" in text  # written before the kill
    assert "printed after epoch 2" not in text


def test_in_process_job_killed_mid_run_leaves_its_log(tmp_path):
    """The process running the job in-process, quiet as a study's (Ray) worker, dies by SIGKILL in
    epoch 2."""
    log = tmp_path / "runs" / "run.log"
    code = (f"from kd_lightning import jobs; jobs.quiet_lightning(); jobs.run_job(jobs.Job({ARGS + ['--trainer.logger.init_args.save_dir', str(tmp_path / 'runs')]!r}, "
            f"{str(log)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert_log_up_to_the_kill(log)


def test_subprocess_job_killed_mid_run_leaves_its_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key, value in env().items():
        monkeypatch.setenv(key, value)
    log = tmp_path / "runs" / "run.log"
    job = jobs.Job([*ARGS, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], log, isolate=True)
    with pytest.raises(jobs.JobFailed) as err:
        jobs.run_job(job)
    assert err.value.exit_code == -9 and err.value.log == log
    assert_log_up_to_the_kill(log)


def test_in_process_job_that_raises_leaves_its_log_with_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KD_TEST_KILL_AT", "1:0")
    monkeypatch.setenv("KD_TEST_SIGNAL", "NO_SUCH_SIGNAL")  # the callback raises AttributeError
    log = tmp_path / "runs" / "run.log"
    with pytest.raises(jobs.JobFailed) as err:
        jobs.run_job(jobs.Job([*ARGS, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")], log))
    assert err.value.log == log and "AttributeError" in str(err.value)
    text = log.read_text()
    assert "fit --config" in text.splitlines()[0] and "Traceback" in text and "NO_SUCH_SIGNAL" in text


@pytest.mark.slow
def test_ray_worker_killed_mid_run_leaves_the_log_its_failed_row_names(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    from kd_lightning.study import main
    from tests.study.test_study import STUDENT, read_rows, write_study

    monkeypatch.chdir(tmp_path)
    for key, value in env().items():
        monkeypatch.setenv(key, value)
    killed = {**STUDENT, "name": "killed", "reference": False,
              "args": CALLBACKS}  # SIGKILL in epoch 2
    cfg = write_study(tmp_path, methods=[STUDENT, killed], budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(tmp_path / "teachers"),
                 "--workers", "2"]) == 1
    (failed,) = [r for r in read_rows(tmp_path / "out") if r["kind"] == "failed"]
    log = tmp_path / "out" / "runs" / "killed" / "M20" / "seed0" / "run.log"
    assert failed["method"] == "killed" and f"(log: {log})" in failed["error"]
    assert_log_up_to_the_kill(log)
