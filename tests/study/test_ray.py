"""kd-lightning-study on Ray (--workers): the same results as one after another, resumable, and a
run that fails in a worker is recorded as failed while the others finish."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from kd_lightning.study import main
from tests.study.test_study import KD, STUDENT, read_rows, start_and_kill_study, write_study

ray = pytest.importorskip("ray")

KEY = ("method", "M", "seed", "kind", "candidate")


@pytest.fixture
def teachers(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "ray_teachers"


def by_key(rows):
    return {tuple(r[k] for k in KEY): r for r in rows}


@pytest.mark.slow
def test_ray_study_equals_the_sequential_one(tmp_path, monkeypatch, teachers):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = write_study(tmp_path, budgets=[20, 50], seeds=[0, 1], steps=6)
    common = ["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]
    assert main([*common, "--output", str(tmp_path / "seq")]) == 0
    assert main([*common, "--output", str(tmp_path / "ray"), "--workers", "2"]) == 0
    seq, par = by_key(read_rows(tmp_path / "seq")), by_key(read_rows(tmp_path / "ray"))
    assert len(seq) == 8 and par.keys() == seq.keys()
    for key, row in seq.items():  # the same student, bit for bit: the same accuracies
        assert (par[key]["test_acc"], par[key]["teacher_acc"]) == (row["test_acc"], row["teacher_acc"])
        assert par[key]["run_hash"] != "" and par[key]["epochs"] == row["epochs"]
    # the same table (the environment line below it differs: Ray tasks set their thread count)
    table = lambda out: (out / "results.md").read_text().split("\n", 2)[2].split("\nEnvironment")[0]  # noqa: E731
    assert table(tmp_path / "ray") == table(tmp_path / "seq")


@pytest.mark.slow
def test_killed_ray_driver_resumes_without_duplicates(tmp_path, teachers):
    cfg = write_study(tmp_path, seeds=[0, 1, 2], steps=10)
    proc, cmd, env = start_and_kill_study(tmp_path, cfg, teachers, "--workers", "2", timeout=300,
                                          new_session=True)
    with contextlib.suppress(ProcessLookupError):  # what is left of its Ray instance
        os.killpg(proc.pid, signal.SIGKILL)
    first = read_rows(tmp_path / "out")
    assert 2 <= len(first) < 12, "the study should have been killed part-way"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 12 == len({(r["method"], r["M"], r["seed"]) for r in rows})
    assert rows[: len(first)] == first  # rows written before the kill kept as they were


@pytest.mark.slow
def test_run_failing_in_a_worker_is_recorded_and_the_others_finish(tmp_path, monkeypatch, capsys,
                                                                    teachers):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # parses (a float), fails in the method's own check when the worker builds the run
    kd = {**KD, "set": {"model.init_args.kd_weight": {20: -1.0, "default": 0.9}}}
    cfg = write_study(tmp_path, methods=[STUDENT, kd], budgets=[20, 50], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers),
                 "--workers", "2"]) == 1
    rows = by_key(read_rows(tmp_path / "out"))
    failed = rows.pop(("ResponseKD", "20", "0", "failed", ""))
    assert "kd_weight" in failed["error"] and failed["test_acc"] == ""
    log = tmp_path / "out" / "runs" / "ResponseKD" / "M20" / "seed0" / "run.log"
    assert f"(log: {log})" in failed["error"] and "kd_weight" in log.read_text()
    assert sorted((k[0], k[1]) for k in rows) == [("ResponseKD", "50"), ("student alone", "20"),
                                                  ("student alone", "50")]
    assert all(r["kind"] == "run" and r["test_acc"] != "" for r in rows.values())
    assert "1 run(s) failed" in capsys.readouterr().err


def test_workers_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    cfg = write_study(tmp_path, budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install kd_lightning[ray]" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_resources_a_run_cannot_get_are_refused(tmp_path, capsys):
    cfg = write_study(tmp_path, budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--workers", "2", "--cpus-per-run", "3"]) == 2
    assert "--cpus-per-run 3.0 is more than the 2 CPUs" in capsys.readouterr().err
    assert main(["--config", str(cfg), "--cpus-per-run", "2"]) == 2
    assert "with --workers N or --address ADDR" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
