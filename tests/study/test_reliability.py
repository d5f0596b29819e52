"""A study under failure: diverged runs, overwrite, torn results, signals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd_lightning.study import main
from tests.study.test_study import KD, STUDENT, read_rows, write_study


# ---- the study ---------------------------------------------------------------------------------
DIVERGING = {**STUDENT, "name": "diverging", "reference": False,
             "args": ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "1e12"]}


@pytest.fixture
def teachers(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "reliability_teachers"


def test_study_records_a_diverged_run_as_failed_and_goes_on(tmp_path, monkeypatch, capsys, teachers):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, methods=[STUDENT, DIVERGING], budgets=[20], seeds=[0])
    argv = ["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]
    assert main(argv) == 1  # finished, with a failure
    rows = read_rows(tmp_path / "out")
    ok = [r for r in rows if r["kind"] == "run"]
    failed = [r for r in rows if r["kind"] == "failed"]
    assert [r["method"] for r in ok] == ["student alone"] and ok[0]["test_acc"] != ""
    assert [r["method"] for r in failed] == ["diverging"] and failed[0]["test_acc"] == ""
    assert "training diverged" in failed[0]["error"]
    report = (tmp_path / "out" / "results.md").read_text()
    assert "Failed runs" in report and "diverging M=20 seed=0" in report
    table = report.split("Failed runs")[0]
    assert "| 20 |" in table and table.count("–") >= 1  # no accuracy for the failed method
    # a rerun tries the failed run again (and records it again), never the finished one
    assert main(argv) == 1
    rows = read_rows(tmp_path / "out")
    assert [r["kind"] for r in rows].count("run") == 1
    assert [r["kind"] for r in rows].count("failed") == 2
    # with --stop-on-failure the study stops at the failed run
    assert main(argv + ["--stop-on-failure"]) == 1
    assert "training diverged" in capsys.readouterr().err


def test_overwrite_deletes_only_what_a_study_wrote(tmp_path, monkeypatch, capsys, teachers):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, methods=[STUDENT], budgets=[20], seeds=[0])
    base = ["--no-progress", "--teacher-cache", str(teachers)]
    assert main(["--config", str(cfg), *base]) == 0
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "curves.csv").write_text("method,M,seed,candidate,epoch,val_acc\n")  # --save's
    other = write_study(tmp_path, "other.yaml", methods=[STUDENT], budgets=[20], seeds=[0], steps=3)
    assert main(["--config", str(other), *base, "--overwrite"]) == 0
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # not the study's: kept
    assert not (tmp_path / "out" / "curves.csv").exists()  # the other study's curves: gone
    assert len(read_rows(tmp_path / "out")) == 1


@pytest.mark.parametrize("where", ["foreign", "cwd"])
def test_overwrite_refuses_folders_that_are_not_a_study_output(where, tmp_path, monkeypatch, capsys,
                                                               teachers):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "configs.yaml").write_text("precious")
    cfg = write_study(work, methods=[STUDENT], budgets=[20], seeds=[0])
    if where == "foreign":
        target = work / "foreign"
        target.mkdir()
        (target / "data.bin").write_text("precious")
    else:  # the working folder itself, even when it holds an earlier study's results
        target = work
        (work / "study.json").write_text(json.dumps({"hash": "0" * 12}))
    code = main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers),
                 "--output", str(target), "--overwrite"])
    assert code == 2
    err = capsys.readouterr().err
    assert "kd-lightning-study: error:" in err and "Traceback" not in err
    assert (work / "configs.yaml").read_text() == "precious"
    assert cfg.is_file()
    if where == "foreign":
        assert (target / "data.bin").read_text() == "precious"
        assert "no study results" in err and "--overwrite" not in err.split("error:")[1].split(".")[0]
    else:
        assert "refuses" in err


def test_torn_last_line_of_results_csv_is_detected_and_that_run_redone(tmp_path):
    from kd_lightning.study.results import Results

    results = Results(tmp_path / "results.csv", "h")
    base = {"study_hash": "h", "method": "KD", "M": "50", "seed": 0, "test_acc": 61.25,
            "kind": "run", "candidate": "", "wall_time_s": 3.5}
    results.append(base)
    results.append({**base, "seed": 1, "test_acc": 62.5})
    text = (tmp_path / "results.csv").read_text()
    for cut in (3, 12, 25):  # a kill part-way through writing the second row
        (tmp_path / "results.csv").write_text(text[:-cut])
        rows = results.rows()
        assert [(r["seed"], r["test_acc"]) for r in rows] == [("0", "61.25")]
        assert results.done() == {("KD", "50", 0, "run", "")}  # seed 1 will be redone
    results.append({**base, "seed": 1, "test_acc": 63.0})  # the redone run starts a fresh line
    assert [(r["seed"], r["test_acc"]) for r in results.rows()] == [("0", "61.25"), ("1", "63.0")]


def test_study_lists_only_real_methods_as_valid():
    from kd_lightning.methods import METHODS

    names = set(METHODS)
    assert {"ResponseKD", "FitNet", "MutualDistillation", "Supervised"} <= names
    assert not names & {"DistillationModule", "FeatureDistillation", "TwoStageFeatureDistillation"}


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_a_run_stops_the_study_and_the_rerun_finishes_it(
        sig, code, tmp_path, monkeypatch, capsys, teachers, request):
    """Ctrl-C or pre-emption stops a sequential study (status 130 / 143): the interrupted run is
    not recorded (as failed or otherwise), Ctrl-C works again afterwards, no checkpoint lands in the
    working directory, and the rerun trains what is missing."""
    import signal

    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, methods=[STUDENT], budgets=[20], seeds=[0, 1])
    argv = ["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers),
            "--trainer.callbacks+=tests.kill_helpers.KillAt"]
    # the second epoch's first batch: the students train 4 epochs, the (cached) teacher 1
    monkeypatch.setenv("KD_TEST_KILL_AT", "1:0")
    monkeypatch.setenv("KD_TEST_SIGNAL", sig)
    # Ctrl-C as in a terminal (a test process started in the background may ignore SIGINT)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, outer))
    sigint = signal.getsignal(signal.SIGINT)
    assert main(argv) == code
    assert "interrupted; finished runs are kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is sigint
    results = tmp_path / "out" / "results.csv"  # the interrupted run is not recorded as failed
    assert not results.exists() or read_rows(tmp_path / "out") == []
    assert not list(tmp_path.glob("*.ckpt"))
    monkeypatch.delenv("KD_TEST_KILL_AT")
    assert main(argv) == 0
    assert sorted((r["seed"], r["kind"]) for r in read_rows(tmp_path / "out")) == [
        ("0", "run"), ("1", "run")]


def test_torn_and_malformed_rows_are_reported_with_the_run_redone(tmp_path, monkeypatch, capsys, teachers):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, methods=[STUDENT], budgets=[20], seeds=[0, 1])
    argv = ["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]
    assert main(argv) == 0
    path = tmp_path / "out" / "results.csv"
    header, first, second = path.read_text().splitlines()
    # a malformed row between them (seed not a number) and the last row cut short by a kill
    path.write_text(f"{header}\n{first}\n{first.replace(',0,', ',zero,', 1)}\n{second[:-20]}")
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{path}: line 3 is malformed (it does not parse; run: student alone M=20 seed=zero); it is " \
           f"left out and its run, if one of this study, is trained again." in out
    assert f"{path}: line 4 is torn (cut short while it was written, e.g. by a kill; run: student alone " \
           f"M=20 seed=1); it is left out and that run is trained again." in out
    rows = read_rows(tmp_path / "out")
    assert [(r["seed"], r["kind"]) for r in rows] == [("0", "run"), ("1", "run")]
    # study.json and results.md say where the runs ran
    meta = json.loads((tmp_path / "out" / "study.json").read_text())
    import torch

    (env,) = meta["run_environments"]
    assert env["torch"] == torch.__version__ and env["cpu_capability"] and env["accelerator"] == "cpu"
    assert meta["environment"]["threads"] == torch.get_num_threads()
    from kd_lightning.environment import summary

    assert f"\nEnvironment: {summary(env)}.\n" in (tmp_path / "out" / "results.md").read_text()


def test_a_run_killed_part_way_resumes_from_its_last_epoch_to_the_same_weights(tmp_path, teachers):
    """A study killed with SIGKILL in a run's second epoch (a lost machine or session: no hook,
    no checkpoint written then): the rerun continues that run from its first epoch's resume
    checkpoint, in the same log folder, and ends with the weights, validation and test accuracy
    of an uninterrupted study; the resume folder is gone once the run is recorded."""
    import os
    import subprocess
    import sys

    import torch

    from tests.conftest import REPO

    kd = {**KD, "grid": {"model.init_args.temperature": [4.0]}}  # a candidate: its weights are saved
    args = ["--data.batch_size", "10", "--data.batches_per_step", "1", "--trainer.deterministic", "true",
            "--trainer.limit_test_batches", "1"]

    def study(folder: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
        folder.mkdir(exist_ok=True)
        cfg = write_study(folder, methods=[kd], budgets=[40], seeds=[0], steps=12, args=args)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "KD_TEST_SIGNAL": "SIGKILL"}
        env.pop("KD_TEST_KILL_AT", None)
        env.update({"KD_TEST_KILL_AT": kill_at} if kill_at else {})
        cmd = [sys.executable, "-m", "kd_lightning.study", "--config", str(cfg), "--no-progress",
               "--teacher-cache", str(teachers), "--trainer.callbacks+=tests.kill_helpers.KillAt",
               "--resume-every", "0"]
        return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)

    whole = study(tmp_path / "a")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = study(tmp_path / "b", kill_at="1:0")  # 4 steps an epoch, 3 epochs: killed in the second
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_b = tmp_path / "b" / "out" / "runs" / "ResponseKD" / "M40" / "seed0" / "temperature=4.0"
    resume = run_b / "resume" / "resume.ckpt"
    assert torch.load(resume, weights_only=True)["epoch"] == 0  # the first epoch's end
    resumed = study(tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after epoch 1" in resumed.stdout
    log = (run_b / "run.log").read_text()  # both attempts, in order
    assert log.count("kd-lightning fit ") == 2 and log.index("--- resumed after epoch 1 from ") > log.index("fit ")
    assert not (run_b / "resume").exists()
    assert [p.name for p in run_b.glob("version_*")] == ["version_0"]  # one log history
    run_a = tmp_path / "a" / "out" / "runs" / "ResponseKD" / "M40" / "seed0" / "temperature=4.0"
    a, b = (torch.load(r / "final.ckpt", weights_only=True)["state_dict"] for r in (run_a, run_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same machine: bit for bit
    rows_a, rows_b = read_rows(tmp_path / "a" / "out"), read_rows(tmp_path / "b" / "out")
    for col in ("kind", "val_acc", "test_acc"):
        assert [r[col] for r in rows_a] == [r[col] for r in rows_b]
