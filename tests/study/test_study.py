"""kd-lightning-study end to end, on tiny configurations (real trainings, a few steps each)."""

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

from kd_lightning import jobs
from kd_lightning.study import main
from tests.conftest import CONFIGS, REPO, tb_scalars

TEACHER_ARGS = ["--data.batches_per_step", "1", "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
                "--trainer.limit_test_batches", "1", "--trainer.enable_model_summary", "false"]
STUDENT = {"name": "student alone", "config": str(CONFIGS / "mnist1d/student.yaml"), "method": "Supervised",
           "reference": True}
KD = {"name": "ResponseKD", "config": str(CONFIGS / "mnist1d/response.yaml"), "method": "ResponseKD"}


def write_study(tmp: Path, name: str = "study.yaml", **over) -> Path:
    cfg = {
        "name": "tiny", "output": str(tmp / "out"),
        "teacher": {"config": str(CONFIGS / "mnist1d/teacher.yaml"), "args": TEACHER_ARGS},
        "budgets": [20, 50], "seeds": [0, 1], "steps": 4,
        "epoch_args": {"model.init_args.lr_scheduler.init_args.T_max": 1.0},
        "args": ["--trainer.limit_test_batches", "1"],
        "methods": [STUDENT, KD],
    }
    cfg.update(over)
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def hparams(run_dir: str, version: str = "version_0") -> dict:
    return yaml.safe_load((Path(run_dir) / version / "hparams.yaml").read_text())


@pytest.fixture
def teachers(tmp_path_factory) -> Path:
    """One teacher cache for the tests of this file (the tiny teacher trains once)."""
    return tmp_path_factory.getbasetemp() / "study_teachers"


def test_tiny_study_end_to_end_per_budget_settings_and_teacher_cache(tmp_path, monkeypatch, capsys, teachers):
    monkeypatch.chdir(tmp_path)
    kd = {**KD, "set": {"model.init_args.kd_weight": {20: 0.5, "default": 0.9}}}
    cfg = write_study(tmp_path, methods=[STUDENT, kd], steps={20: 4, "default": 6},
                      set={"data.batch_size": {20: 10, "default": 25}})
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]) == 0
    out = tmp_path / "out"
    rows = read_rows(out)
    assert {(r["method"], r["M"], r["seed"]) for r in rows} == {
        (m, b, s) for m in ("student alone", "ResponseKD") for b in ("20", "50") for s in ("0", "1")}
    assert all(0 <= float(r["test_acc"]) <= 100 and r["kind"] == "run" for r in rows)
    # per-budget steps and batch size: M=20 -> 2 steps per epoch, 4 steps; M=50 -> 2 per epoch, 6 steps
    assert {(r["M"], r["epochs"], r["steps"]) for r in rows} == {("20", "2", "4"), ("50", "3", "6")}
    for r in rows:  # the per-budget values reached the runs' modules
        hp = hparams(r["run_dir"])
        assert hp["batch_size"] == (10 if r["M"] == "20" else 25)
        if r["method"] == "ResponseKD":
            assert hp["kd_weight"] == (0.5 if r["M"] == "20" else 0.9)
    md = (out / "results.md").read_text()
    assert "| M (labelled examples) | student alone | ResponseKD |" in md and "±" in md
    assert "Training length: M=20: 4 steps, M=50: 6 steps" in md
    assert (out / "accuracy_vs_m.png").stat().st_size > 1000
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "| 20 |" in printed and "| 50 |" in printed
    assert "ResponseKD M=50 seed=1: test acc" in printed  # a line per finished run
    assert "training the teacher (" in printed and "teacher: epoch 1/1" in printed  # its progress

    # a second study with the same teacher reuses the cached teacher
    calls = []
    real = jobs.run_job
    monkeypatch.setattr(jobs, "run_job", lambda job, *a: calls.append(job.args) or real(job, *a))
    cfg2 = write_study(tmp_path, "study2.yaml", output=str(tmp_path / "out2"), budgets=[30], seeds=[0])
    assert main(["--config", str(cfg2), "--no-progress", "--teacher-cache", str(teachers)]) == 0
    assert len(calls) == 2  # the two student runs only: no teacher run
    assert all("configs/mnist1d/teacher.yaml" not in " ".join(map(str, c)) for c in calls)


def test_runs_validate_only_when_the_study_args_turn_it_on(tmp_path, monkeypatch, teachers):
    """A study's runs skip validation (the test is of the final weights); ``args:
    [--trainer.limit_val_batches=...]`` turns it on, so every epoch logs val/acc, the validation
    curve that shows whether a run's length was enough."""
    monkeypatch.chdir(tmp_path)
    curves = {}
    for name, extra in (("plain", []), ("curves", ["--trainer.limit_val_batches=2"])):
        cfg = write_study(tmp_path, f"{name}.yaml", output=str(tmp_path / name), budgets=[20], seeds=[0],
                          methods=[STUDENT], args=["--trainer.limit_test_batches", "1", *extra])
        assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]) == 0
        (row,) = read_rows(tmp_path / name)
        assert row["epochs"] == "4" and float(row["test_acc"]) >= 0  # 4 steps of one per epoch
        curves[name] = tb_scalars(Path(row["run_dir"]) / "version_0").get("val/acc", [])
    assert curves["plain"] == [] and len(curves["curves"]) == 4  # one point per epoch
    assert all(0 <= v <= 1 for v in curves["curves"])


def test_grid_chooses_on_validation_and_reports_the_chosen_test(tmp_path, monkeypatch, capsys, teachers):
    """Each candidate's run is the run a plain entry with that value gives: same weights, so the
    chosen candidate's test accuracy is exactly the plain entry's."""
    monkeypatch.chdir(tmp_path)
    methods = [{**KD, "name": "T=4", "set": {"model.init_args.temperature": 4.0}},
               {**KD, "name": "T=1", "set": {"model.init_args.temperature": 1.0}},
               {**KD, "name": "grid", "grid": {"model.init_args.temperature": [4.0, 1.0]}}]
    cfg = write_study(tmp_path, methods=methods, budgets=[20], seeds=[0], steps=6)
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]) == 0
    out = tmp_path / "out"
    rows = read_rows(out)
    cands = [r for r in rows if r["kind"] == "candidate"]
    assert [r["candidate"] for r in cands] == ['{"model.init_args.temperature": 4.0}',
                                               '{"model.init_args.temperature": 1.0}']
    # validated and tested; each candidate's test is its twin plain entry's
    assert all(0 <= float(r["val_acc"]) <= 100 for r in cands)
    for cand in cands:
        twin = next(r for r in rows if r["method"] == ("T=4" if "4.0" in cand["candidate"] else "T=1"))
        assert cand["test_acc"] == twin["test_acc"]
    best = max(cands, key=lambda r: float(r["val_acc"]))  # first on a tie, as listed
    chosen = [r for r in rows if r["kind"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["candidate"] == best["candidate"]
    assert chosen[0]["test_acc"] == best["test_acc"]
    # the chosen weights are kept, the other candidate's are deleted
    kept = {str(p.relative_to(out / "runs")) for p in (out / "runs").rglob("final.ckpt")}
    label = "temperature=4.0" if "4.0" in best["candidate"] else "temperature=1.0"
    assert kept == {f"grid/M20/seed0/{label}/final.ckpt"}

    md = (out / "results.md").read_text()
    assert f"| 20 | **{label}** (val {float(best['val_acc']):.2f}; " in md
    assert "one seed (0; n=1, so no std)" in md and "±" not in md.split("\n\n")[2]
    assert f"{label} chosen" in capsys.readouterr().out

    # --report-only rebuilds the same results.md from results.csv, training nothing
    (out / "results.md").unlink()
    (out / "accuracy_vs_m.png").unlink()
    monkeypatch.setattr(jobs, "run_job", lambda *a, **k: pytest.fail("nothing may train"))
    assert main(["--config", str(cfg), "--report-only"]) == 0
    assert (out / "results.md").read_text() == md
    assert (out / "accuracy_vs_m.png").stat().st_size > 1000


def test_rerunning_a_finished_study_runs_nothing(tmp_path, monkeypatch, teachers):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]) == 0
    before = read_rows(tmp_path / "out")
    monkeypatch.setattr(jobs, "run_job", lambda *a, **k: pytest.fail("nothing should run again"))
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]) == 0
    assert read_rows(tmp_path / "out") == before


def start_and_kill_study(tmp_path: Path, cfg: Path, teachers: Path, *extra: str, timeout: float = 240,
                         new_session: bool = False):
    """Start ``kd-lightning-study`` in a subprocess, SIGKILL it (the driver only) once at least two
    rows are in results.csv; returns the process and ``(cmd, env)`` for the rerun."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kd_lightning.study", "--config", str(cfg), "--no-progress",
           "--teacher-cache", str(teachers), *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=new_session)
    csv_path = tmp_path / "out" / "results.csv"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if csv_path.is_file() and len(read_rows(tmp_path / "out")) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc, cmd, env


def test_killed_study_resumes_without_redoing_runs(tmp_path, teachers):
    cfg = write_study(tmp_path, seeds=[0, 1], steps=10)
    _, cmd, env = start_and_kill_study(tmp_path, cfg, teachers)
    first = read_rows(tmp_path / "out")
    assert 2 <= len(first) < 8, "the study should have been killed part-way"
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 8
    assert len({(r["method"], r["M"], r["seed"]) for r in rows}) == 8  # no run done twice
    assert rows[: len(first)] == first  # completed runs kept as they were


def test_runs_in_a_subprocess_when_the_strategy_needs_one(tmp_path, monkeypatch, capsys):
    """Multi-process strategies re-launch their command: such runs go through
    `python -m kd_lightning.jobs`, with the teacher's progress and the metrics passed back."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jobs, "needs_subprocess", lambda run_config: True)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = write_study(tmp_path, methods=[KD], budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(tmp_path / "t")]) == 0
    assert "teacher: epoch 1/1" in capsys.readouterr().out  # forwarded from the subprocess
    (row,) = read_rows(tmp_path / "out")
    assert 0 <= float(row["test_acc"]) <= 100 and row["teacher_acc"] != ""
    assert (Path(row["run_dir"]) / "run.result.json").is_file()


# ---- bad input and failures ------------------------------------------------------------------
def _error(argv, capsys, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("kd-lightning-study: error:") and "Traceback" not in err
    return err


def test_budget_the_dataset_cannot_supply(tmp_path, capsys):
    cfg = write_study(tmp_path, budgets=[20, 100000])
    err = _error(["--config", str(cfg)], capsys)
    assert "M=100000" in err and "larger than the training set" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    cfg = write_study(tmp_path, budgets=[5])
    assert "smaller than the number of classes" in _error(["--config", str(cfg)], capsys)


def test_output_of_a_different_study_is_refused(tmp_path, monkeypatch, capsys, teachers):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]) == 0
    before = (tmp_path / "out" / "results.csv").read_text()
    other = write_study(tmp_path, budgets=[20], seeds=[0], steps=5)
    err = _error(["--config", str(other), "--no-progress", "--teacher-cache", str(teachers)], capsys)
    assert "--overwrite" in err and "different study" in err
    assert (tmp_path / "out" / "results.csv").read_text() == before
    assert "different study" in _error(["--config", str(other), "--report-only"], capsys)
    assert main(["--config", str(other), "--no-progress", "--overwrite",
                 "--teacher-cache", str(teachers)]) == 0
    assert (tmp_path / "out" / "results.csv").read_text() != before


def test_failing_teacher_names_the_study_teacher_config_and_keeps_results(tmp_path, monkeypatch, capsys,
                                                                          teachers):
    monkeypatch.chdir(tmp_path)
    cfg = write_study(tmp_path, budgets=[20], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers)]) == 0
    before = (tmp_path / "out" / "results.csv").read_text()
    # a teacher whose data files are missing fails when it starts
    teacher_cfg = tmp_path / "my_teacher.yaml"
    teacher_cfg.write_text((CONFIGS / "mnist1d/teacher.yaml").read_text())
    bad = write_study(tmp_path, "bad.yaml", budgets=[20], seeds=[0], teacher={
        "config": str(teacher_cfg),
        "args": ["--data.dataset", "mnist", "--data.root", str(tmp_path / "none")]})
    err = _error(["--config", str(bad), "--no-progress", "--teacher-cache", str(tmp_path / "new"),
                  "--output", str(tmp_path / "out_bad")], capsys)
    assert "teacher run failed" in err and str(teacher_cfg) in err
    assert "configs/mnist1d/teacher.yaml" not in err
    assert (tmp_path / "out" / "results.csv").read_text() == before


def test_failing_run_stops_the_study_with_its_error_on_request(tmp_path, monkeypatch, capsys, teachers):
    monkeypatch.chdir(tmp_path)
    # parses (a float), fails in the method's own check when the run builds it
    kd = {**KD, "set": {"model.init_args.kd_weight": -1.0}}
    cfg = write_study(tmp_path, methods=[STUDENT, kd], budgets=[20], seeds=[0])
    err = _error(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers),
                  "--stop-on-failure"], capsys, code=1)
    assert "run ResponseKD M=20 seed=0 failed" in err and "kd_weight" in err and "run.log" in err
    assert [r["method"] for r in read_rows(tmp_path / "out")] == ["student alone"]  # kept


@pytest.mark.slow
@pytest.mark.ddp
def test_grid_study_under_ddp_on_two_cpu_processes(tmp_path, monkeypatch, teachers):
    """--trainer.strategy=ddp --trainer.devices 2: candidates are fitted, validated, saved and the
    chosen one tested, each in a `python -m kd_lightning.jobs` process group; both processes write
    the resume checkpoint together at every epoch's end (--resume-every 0)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    kd = {**KD, "grid": {"model.init_args.temperature": [1.0, 4.0]}}
    cfg = write_study(tmp_path, methods=[kd], budgets=[40], seeds=[0])
    assert main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(teachers),
                 "--trainer.strategy=ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
                 "--resume-every", "0"]) == 0
    rows = read_rows(tmp_path / "out")
    assert [r["kind"] for r in rows] == ["candidate", "candidate", "chosen"]
    assert not list((tmp_path / "out" / "runs").rglob("resume"))  # removed once each run is recorded
    assert all(r["val_acc"] for r in rows) and rows[-1]["test_acc"]
