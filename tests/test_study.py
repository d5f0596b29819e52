"""kd-lightning-study on tiny configurations."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kd_lightning import study
from kd_lightning.study import format_table, load_study, main
from tests.conftest import CONFIGS, REPO

TEACHER_ARGS = ["--data.batches_per_step", "1", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                "--trainer.enable_model_summary", "false"]


def write_study(tmp: Path, **over) -> Path:
    cfg = {
        "name": "tiny", "output": str(tmp / "out"),
        "teacher": {"config": str(CONFIGS / "mnist1d/teacher.yaml"), "args": TEACHER_ARGS},
        "budgets": [20, 50], "seeds": [0, 1], "steps": 4,
        "epoch_args": {"model.init_args.lr_scheduler.init_args.T_max": 1.0},
        "args": ["--trainer.limit_test_batches", "1"],
        "methods": [
            {"name": "student alone", "config": str(CONFIGS / "mnist1d/student.yaml"),
             "method": "Supervised", "reference": True},
            {"name": "ResponseKD", "config": str(CONFIGS / "mnist1d/response.yaml"), "method": "ResponseKD"},
        ],
    }
    cfg.update(over)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_format_table_mean_std_and_best_marked():
    rows = [{"method": "A", "M": "50", "test_acc": v} for v in (60.0, 62.0)]
    rows += [{"method": "B", "M": "50", "test_acc": v} for v in (70.0, 74.0)]
    rows += [{"method": "A", "M": "full", "test_acc": 90.0}, {"method": "B", "M": "full", "test_acc": 80.0}]
    table = format_table(rows, ["A", "B"], [50, None, 100])
    lines = table.splitlines()
    assert lines[0] == "| M | A | B |"
    assert lines[2] == "| 50 | 61.00 ± 1.41 | **72.00 ± 2.83** |"  # sample std over seeds
    assert lines[3] == "| full | **90.00 ± 0.00** | 80.00 ± 0.00 |"
    assert len(lines) == 4  # budget 100 has no results: no row


def test_tiny_study_end_to_end_and_teacher_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path)
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "out"
    rows = read_rows(out)
    assert len(rows) == 2 * 2 * 2
    assert {(r["method"], r["M"], r["seed"]) for r in rows} == {
        (m, b, s) for m in ("student alone", "ResponseKD") for b in ("20", "50") for s in ("0", "1")}
    assert all(0 <= float(r["test_acc"]) <= 100 for r in rows)
    md = (out / "results.md").read_text()
    assert "| M | student alone | ResponseKD |" in md and "±" in md
    assert (out / "accuracy_vs_m.png").stat().st_size > 1000
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "| 20 |" in printed and "| 50 |" in printed

    # a second study with the same teacher reuses the cached teacher
    calls = []
    real = study.run_fit
    monkeypatch.setattr(study, "run_fit", lambda args, *a: calls.append(args) or real(args, *a))
    cfg2 = write_study(tmp_path, output=str(tmp_path / "out2"), budgets=[30], seeds=[0])
    cfg2 = cfg2.rename(tmp_path / "study2.yaml")
    assert main(["--config", str(cfg2), "--no-progress", "--teacher-cache", str(tmp_path / "_teachers")]) == 0
    assert len(calls) == 2  # the two student runs only: no teacher run
    assert all("configs/mnist1d/teacher.yaml" not in " ".join(map(str, c)) for c in calls)


def test_rerunning_a_finished_study_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    before = read_rows(tmp_path / "out")
    monkeypatch.setattr(study, "run_fit", lambda *a: pytest.fail("nothing should run again"))
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    assert read_rows(tmp_path / "out") == before


def test_killed_study_resumes_without_redoing_runs(tmp_path):
    cfg = write_study(tmp_path, seeds=[0, 1], steps=10)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "kd_lightning.study", "--config", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    csv_path = tmp_path / "out" / "results.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if csv_path.is_file() and len(read_rows(tmp_path / "out")) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = read_rows(tmp_path / "out")
    assert 2 <= len(first) < 8, "the study should have been killed part-way"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 8
    assert len({(r["method"], r["M"], r["seed"]) for r in rows}) == 8  # no run done twice
    assert rows[: len(first)] == first  # completed runs kept as they were


# ---- bad input ---------------------------------------------------------------------------------
def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd-lightning-study: error:") and "Traceback" not in err
    return err


def test_unknown_method_lists_valid_ones(tmp_path, capsys):
    cfg = write_study(tmp_path, methods=[{"name": "x", "config": str(CONFIGS / "mnist1d/student.yaml"),
                                          "method": "HintonKD"}])
    err = _error(["--config", str(cfg)], capsys)
    assert "unknown method 'HintonKD'" in err and "ResponseKD" in err and "Supervised" in err


def test_budget_the_dataset_cannot_supply(tmp_path, capsys):
    cfg = write_study(tmp_path, budgets=[20, 100000])
    err = _error(["--config", str(cfg)], capsys)
    assert "M=100000" in err and "larger than the training set" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    cfg = write_study(tmp_path, budgets=[5])
    assert "smaller than the number of classes" in _error(["--config", str(cfg)], capsys)


def test_output_of_a_different_study_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    before = (tmp_path / "out" / "results.csv").read_text()
    other = write_study(tmp_path, budgets=[20], seeds=[0], steps=5)
    err = _error(["--config", str(other), "--no-progress"], capsys)
    assert "--overwrite" in err and "different study" in err
    assert (tmp_path / "out" / "results.csv").read_text() == before
    assert main(["--config", str(other), "--no-progress", "--overwrite"]) == 0
    assert (tmp_path / "out" / "results.csv").read_text() != before


def test_failing_teacher_stops_the_study_and_keeps_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    before = (tmp_path / "out" / "results.csv").read_text()
    # a fresh teacher cache forces a teacher run; a bad Trainer flag makes it fail
    err = _error(["--config", str(cfg), "--no-progress", "--teacher-cache", str(tmp_path / "new"),
                  "--trainer.precision", "no-such-precision"], capsys)
    assert "teacher run failed" in err
    assert (tmp_path / "out" / "results.csv").read_text() == before


def test_shipped_study_config_and_quick_preset_load():
    spec = load_study(CONFIGS / "studies/mnist1d.yaml", "quick")
    assert spec.budgets[-1] is None and len(spec.seeds) >= 2
    assert set(spec.budgets[:-1]) >= {50, 100, 500}
    assert any(m.reference for m in spec.methods)
