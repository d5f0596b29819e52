"""kd_lightning.jobs: one kd-lightning job in this process or a subprocess, its result and failure."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kd_lightning import jobs
from tests.conftest import CONFIGS, TINY


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / "mnist1d/student.yaml"), *TINY, "--seed_everything", "3",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--data.train_subset", "40", "--data.subset_seed", "3", *extra]


def test_a_job_in_process_and_in_a_subprocess_equals_a_fresh_cli_run(tmp_path, monkeypatch):
    """The same metrics as `kd-lightning fit` itself; the run folder, checkpoints and log are
    reported; the subprocess passes the epochs' progress back."""
    from kd_lightning.cli import cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = _args(tmp_path, "--trainer.logger.init_args.name", "a")
    here = jobs.run_job(jobs.Job(args, tmp_path / "a.log"))
    assert "test/acc" in here.metrics and here.seconds > 0 and here.log == str(tmp_path / "a.log")
    assert Path(here.run_dir) == tmp_path / "runs" / "a" / "version_0"
    assert Path(here.checkpoints[0]).name == "best.ckpt"
    assert all(Path(p).is_file() for p in here.checkpoints)
    assert (tmp_path / "a.log").read_text().startswith("kd-lightning fit --config ")
    fresh = cli_main(args=_args(tmp_path, "--trainer.logger.init_args.name", "fresh"))
    assert here.metrics == {k: float(v) for k, v in fresh.trainer.callback_metrics.items()}

    events = []
    args = _args(tmp_path, "--trainer.logger.init_args.name", "b",
                 "--trainer.callbacks+=kd_lightning.jobs.EpochProgress")
    there = jobs.run_job(jobs.Job(args, tmp_path / "b.log", isolate=True,
                                  save_weights=tmp_path / "w.ckpt"), events.append)
    assert there.metrics == here.metrics and (tmp_path / "w.ckpt").is_file()
    assert Path(there.run_dir) == tmp_path / "runs" / "b" / "version_0"
    assert [(e["epoch"], e["max_epochs"]) for e in events] == [(1, 1)]


def test_in_process_jobs_share_one_parser_and_each_equals_a_fresh_cli_run(tmp_path, monkeypatch):
    """A study's jobs reuse the parser the first one built (its construction is most of a short
    run's fixed cost); a later job, with other arguments, still equals its own fresh CLI run."""
    from kd_lightning.cli import KDLightningCLI, cli_main
    from kd_lightning.training import lightning_compat

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(lightning_compat, "_PARSERS", {})
    built = []
    original = KDLightningCLI.setup_parser
    monkeypatch.setattr(KDLightningCLI, "setup_parser",
                        lambda self, *a: (built.append(type(self).__name__), original(self, *a))[1])
    first = jobs.run_job(jobs.Job(_args(tmp_path, "--trainer.logger.init_args.name", "a"), tmp_path / "a.log"))
    other = _args(tmp_path, "--trainer.logger.init_args.name", "b", "--seed_everything", "5",
                  "--data.train_subset", "60")
    second = jobs.run_job(jobs.Job(other, tmp_path / "b.log"))
    assert built.count("JobCLI") == 1
    fresh = cli_main(args=[*other[:-4], "--trainer.logger.init_args.name", "fresh", *other[-4:]])
    assert second.metrics == {k: float(v) for k, v in fresh.trainer.callback_metrics.items()}
    assert second.metrics != first.metrics


@pytest.mark.parametrize("isolate", [False, True])
def test_a_failing_job_says_why_with_its_exit_status_and_log(tmp_path, monkeypatch, isolate):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = jobs.Job(_args(tmp_path, "--data.train_subset", "100000"), tmp_path / "x.log", isolate)
    with pytest.raises(jobs.JobFailed, match="larger than the training set") as err:
        jobs.run_job(job)
    assert err.value.exit_code == 2 and err.value.log == tmp_path / "x.log"
    assert "larger than the training set" in (tmp_path / "x.log").read_text()


@pytest.mark.parametrize("trainer, expected", [
    ({"strategy": "auto", "devices": 1, "num_nodes": 1, "accelerator": "cpu"}, False),
    ({"strategy": "auto", "devices": "auto", "num_nodes": 1, "accelerator": "cpu"}, False),
    ({"strategy": "ddp", "devices": 2, "num_nodes": 1, "accelerator": "cpu"}, True),
    ({"strategy": "auto", "devices": 2, "num_nodes": 1, "accelerator": "cpu"}, True),
    ({"strategy": "auto", "devices": "0,1", "num_nodes": 1, "accelerator": "gpu"}, True),
    ({"strategy": "auto", "devices": "1", "num_nodes": 1, "accelerator": "gpu"}, False),
    ({"strategy": "auto", "devices": 1, "num_nodes": 2, "accelerator": "gpu"}, True),
    ({"strategy": SimpleNamespace(class_path="pytorch_lightning.strategies.DDPStrategy"), "devices": 1,
      "num_nodes": 1, "accelerator": "cpu"}, True),
])
def test_multi_process_jobs_go_to_a_subprocess(trainer, expected):
    assert jobs.needs_subprocess(SimpleNamespace(trainer=SimpleNamespace(**trainer))) is expected


def test_a_killed_job_resumes_only_from_a_checkpoint_of_its_own_arguments(tmp_path, monkeypatch):
    """A job with a resume folder, killed with SIGKILL in its second epoch, leaves the first
    epoch's checkpoint; run with other arguments it trains from the start (that checkpoint is not
    its run's, and its log says so after the earlier attempt's), and the folder is removed once the
    job succeeds. A file there that is no checkpoint is not resumed either, and says why."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("KD_TEST_KILL_AT", "1:0")
    monkeypatch.setenv("KD_TEST_SIGNAL", "SIGKILL")
    args = _args(tmp_path, "--trainer.max_epochs", "2", "--trainer.callbacks+=tests.kill_helpers.KillAt")
    job = jobs.Job(args, tmp_path / "a.log", isolate=True, resume=tmp_path / "resume", resume_every=0)
    with pytest.raises(jobs.JobFailed, match="exit status -9"):
        jobs.run_job(job)
    assert (tmp_path / "resume" / jobs.ResumePoint.FILE).is_file()
    assert jobs._resume_args(job).epochs == 1
    # a full checkpoint (optimizer and loops), saved without Lightning's 'weights_only' notice
    assert "`weights_only` was not set" not in (tmp_path / "a.log").read_text()
    monkeypatch.delenv("KD_TEST_KILL_AT")
    (tmp_path / "b.log").write_text("an earlier attempt\n")
    other = jobs.Job([*args, "--model.init_args.optimizer.init_args.lr", "0.02"], tmp_path / "b.log", isolate=True,
                     resume=tmp_path / "resume", resume_every=0)
    assert jobs._resume_args(other).epochs == 0
    result = jobs.run_job(other)
    assert result.resumed_epochs == 0 and "test/acc" in result.metrics
    assert not (tmp_path / "resume").exists()
    assert f"--- not resumed from {tmp_path / 'resume' / 'resume.ckpt'}: it was written by a job with other " \
           f"arguments; trained from the start ---" in (tmp_path / "b.log").read_text()
    assert (tmp_path / "b.log").read_text().startswith("an earlier attempt\n")
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / jobs.ResumePoint.FILE).write_bytes(b"not a checkpoint")
    refused = jobs._resume_args(job)
    assert refused.epochs == 0 and refused.note.startswith(
        f"not resumed from {tmp_path / 'resume' / 'resume.ckpt'}: it cannot be read as a ResumePoint checkpoint (")


@pytest.mark.slow
@pytest.mark.ddp
def test_a_killed_two_process_ddp_job_resumes_from_the_checkpoint_both_ranks_wrote(tmp_path, monkeypatch):
    """Under DDP both processes write the resume checkpoint together (rank 0's clock decides);
    after a SIGKILL of both in the second epoch the job continues from the first epoch's end and
    ends with the weights of an uninterrupted DDP job."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("KD_TEST_SIGNAL", "SIGKILL")
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
           "--trainer.max_epochs", "3", "--trainer.callbacks+=tests.kill_helpers.KillAt"]

    def job(name: str) -> jobs.Job:
        return jobs.Job(_args(tmp_path, *ddp, "--trainer.logger.init_args.name", name), tmp_path / f"{name}.log",
                        isolate=True, save_weights=tmp_path / f"{name}.ckpt", resume=tmp_path / name / "resume",
                        resume_every=0)

    whole = jobs.run_job(job("a"))
    monkeypatch.setenv("KD_TEST_KILL_AT", "1:0")
    with pytest.raises(jobs.JobFailed):
        jobs.run_job(job("b"))
    assert torch.load(tmp_path / "b" / "resume" / jobs.ResumePoint.FILE, weights_only=True)["epoch"] == 0
    monkeypatch.delenv("KD_TEST_KILL_AT")
    resumed = jobs.run_job(job("b"))
    assert resumed.resumed_epochs == 1 and resumed.metrics == whole.metrics
    a, b = (torch.load(tmp_path / f"{n}.ckpt", weights_only=True)["state_dict"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
