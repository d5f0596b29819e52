"""The study runner with a stand-in for training: which runs it starts, with which arguments,
what it chooses on validation, and how it resumes. (Real trainings: tests/study/test_study.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kd_lightning.study.runner as runner
from kd_lightning import jobs
from kd_lightning.study import main
from kd_lightning.study.executors import execute
from kd_lightning.study.results import choose
from kd_lightning.study.runner import weights_digest
from tests.study.test_study import KD, STUDENT, read_rows, write_study


def flag(args: list[str], name: str) -> str | None:
    """The value the CLI would take for --name (the last one, in either form)."""
    value = None
    for i, tok in enumerate(args):
        if tok == f"--{name}":
            value = args[i + 1]
        elif tok.startswith(f"--{name}="):
            value = tok.split("=", 1)[1]
    return value


class FakeRuns:
    """Stands in for jobs.run_job: records every job; metrics from ``metrics(call)``."""

    def __init__(self, metrics=None, interrupt_at: int | None = None, teacher_weight: float = 1.0) -> None:
        self.calls: list[SimpleNamespace] = []
        self.metrics = metrics or (lambda call: {"test/acc": 0.5})
        self.interrupt_at, self.teacher_weight = interrupt_at, teacher_weight

    def __call__(self, job, on_epoch=None):
        args, save_weights = [str(a) for a in job.args], job.save_weights
        if flag(args, "trainer.logger.init_args.name") == "teacher":
            ckpt = Path(flag(args, "trainer.logger.init_args.save_dir")) / "teacher/version_0/checkpoints"
            ckpt.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": {"w": torch.tensor([self.teacher_weight])}, "epoch": 3}, ckpt / "best.ckpt")
            return jobs.JobResult({"test/acc": 0.9}, checkpoints=[str(ckpt / "best.ckpt")])
        call = SimpleNamespace(args=args, validate=job.validate, save_weights=save_weights,
                               subcommand=args[0], ckpt=flag(args, "ckpt_path"))
        self.calls.append(call)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if save_weights:
            Path(save_weights).parent.mkdir(parents=True, exist_ok=True)
            Path(save_weights).write_text("weights")
        return jobs.JobResult(self.metrics(call))


def run_study(tmp_path, monkeypatch, fake: FakeRuns, *extra, **over) -> int:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jobs, "run_job", fake)
    cfg = write_study(tmp_path, **over)
    return main(["--config", str(cfg), "--no-progress", "--teacher-cache", str(tmp_path / "t"), *extra])


def test_per_budget_arguments_and_training_length_reach_every_run(tmp_path, monkeypatch):
    fake = FakeRuns()
    kd = {**KD, "set": {"model.init_args.kd_weight": {20: 0.5, "default": 0.9}}}
    assert run_study(tmp_path, monkeypatch, fake, methods=[STUDENT, kd], budgets=[20, 50, "full"], seeds=[0],
                     steps={20: 4, "default": 6}, epochs={"full": 2},
                     set={"data.batch_size": {20: 10, "default": 25}}) == 0
    got = {(Path(c.args[2]).name, flag(c.args, "data.train_subset"), flag(c.args, "data.batch_size"),
            flag(c.args, "model.init_args.kd_weight"), flag(c.args, "trainer.max_epochs"),
            flag(c.args, "model.init_args.lr_scheduler.init_args.T_max")) for c in fake.calls}
    # M=20: batch 10 -> 2 steps/epoch, 4 steps = 2 epochs; M=50: batch 25, 6 steps = 3 epochs;
    # full: 2 epochs; the cosine schedule spans each run (epoch_args T_max: 1.0 x epochs)
    assert got == {("student.yaml", "20", "10", None, "2", "2"), ("student.yaml", "50", "25", None, "3", "3"),
                   ("student.yaml", "null", "25", None, "2", "2"),
                   ("response.yaml", "20", "10", "0.5", "2", "2"),
                   ("response.yaml", "50", "25", "0.9", "3", "3"),
                   ("response.yaml", "null", "25", "0.9", "2", "2")}
    rows = read_rows(tmp_path / "out")
    assert {(r["M"], r["epochs"], r["steps"]) for r in rows} == {("20", "2", "4"), ("50", "3", "6"),
                                                                 ("full", "2", str(2 * 144))}  # 3600 / 25


def test_data_overrides_are_understood_in_every_command_line_form(tmp_path, monkeypatch):
    """The epoch count follows the batch size the run will use, whichever way it is written."""
    fake = FakeRuns()
    methods = [{**STUDENT, "name": "a", "args": ["--data.batch_size=10"]},
               {**STUDENT, "name": "b", "args": ["--data.batch_size", "5"]},
               {**KD, "name": "c", "args": ["--model.init_args.temperature=2", "--data.drop_last=true",
                                            "--data.batch_size=15"]}]
    assert run_study(tmp_path, monkeypatch, fake, methods=methods, budgets=[20], seeds=[0], steps=4) == 0
    epochs = {flag(c.args, "trainer.logger.init_args.name").split("/")[0]: flag(c.args, "trainer.max_epochs")
              for c in fake.calls}
    # 20 examples: batch 10 -> 2 steps per epoch; batch 5 -> 4; batch 15 dropping the last -> 1
    assert epochs == {"a": "2", "b": "1", "c": "4"}


def test_selection_picks_the_best_mean_validation_accuracy_and_reports_only_its_test(tmp_path, monkeypatch,
                                                                                     capsys):
    # validation accuracy by (temperature, seed): T=4 is best on seed 0 alone, T=2 on the mean;
    # test accuracy would have picked T=1: every candidate is tested, but the test never chooses
    val = {("1.0", "0"): 0.30, ("1.0", "1"): 0.30, ("2.0", "0"): 0.70, ("2.0", "1"): 0.70,
           ("4.0", "0"): 0.80, ("4.0", "1"): 0.40}
    test = {"1.0": 0.99, "2.0": 0.61, "4.0": 0.77}

    def metrics(call):
        assert call.subcommand == "fit" and flag(call.args, "test_after_fit") == "true" and call.validate
        temperature, seed = flag(call.args, "model.init_args.temperature"), flag(call.args, "seed_everything")
        return {"val/acc": val[(temperature, seed)], "test/acc": test[temperature]}

    fake = FakeRuns(metrics)
    kd = {**KD, "grid": {"model.init_args.temperature": [1.0, 2.0, 4.0]}}
    assert run_study(tmp_path, monkeypatch, fake, methods=[kd], budgets=[20], seeds=[0, 1]) == 0
    # six fits, each validated, saved and tested; no test job afterwards
    assert len(fake.calls) == 6 and all(c.save_weights for c in fake.calls)
    rows = read_rows(tmp_path / "out")
    assert sorted(r["test_acc"] for r in rows if r["kind"] == "candidate") == ["61.0", "61.0", "77.0", "77.0",
                                                                              "99.0", "99.0"]
    chosen = [r for r in rows if r["kind"] == "chosen"]
    got = [(r["seed"], r["test_acc"], r["val_acc"]) for r in chosen]
    assert got == [("0", "61.0", "70.0"), ("1", "61.0", "70.0")]
    assert [json.loads(r["candidate"]) for r in chosen] == [{"model.init_args.temperature": 2.0}] * 2
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| 20 | **61.00 ± 0.00** |" in md  # the chosen candidate's test accuracy alone
    assert "| 20 | **temperature=2.0** (val 70.00; temperature=1.0: 30.00, temperature=4.0: 60.00) |" in md
    assert "temperature=2.0 chosen (mean val acc 70.00%" in capsys.readouterr().out
    # the other candidates' weights are removed
    assert not [p for p in (tmp_path / "out").rglob("final.ckpt") if "temperature=2.0" not in str(p)]


def test_candidates_recorded_without_a_test_have_their_kept_weights_tested(tmp_path, monkeypatch):
    """A results.csv whose candidate rows have no test accuracy (written by a version that tested
    only the chosen weights): once the grid is in, the chosen candidate's saved weights are
    tested, one test job per seed, and nothing is trained again."""
    val = {"1.0": 0.30, "2.0": 0.70}

    def metrics(call):
        if call.subcommand == "test":
            return {"test/acc": 0.61 if "temperature=2.0" in call.ckpt else 0.99}
        return {"val/acc": val[flag(call.args, "model.init_args.temperature")], "test/acc": 0.5}

    kd = {**KD, "grid": {"model.init_args.temperature": [1.0, 2.0]}}
    over = dict(methods=[kd], budgets=[20], seeds=[0, 1])
    assert run_study(tmp_path, monkeypatch, FakeRuns(metrics), **over) == 0
    path = tmp_path / "out" / "results.csv"
    rows = [{**r, "test_acc": ""} for r in read_rows(tmp_path / "out") if r["kind"] == "candidate"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    again = FakeRuns(metrics)
    assert run_study(tmp_path, monkeypatch, again, **over) == 0
    assert [(c.subcommand, flag(c.args, "seed_everything")) for c in again.calls] == [("test", "0"), ("test", "1")]
    assert all(Path(c.ckpt).parent.name == "temperature=2.0" for c in again.calls)
    chosen = [r for r in read_rows(tmp_path / "out") if r["kind"] == "chosen"]
    assert [(r["seed"], r["test_acc"], r["val_acc"]) for r in chosen] == [("0", "61.0", "70.0"), ("1", "61.0", "70.0")]


def test_choose_breaks_ties_by_grid_order_and_waits_for_every_run():
    rows = [{"method": "m", "M": "50", "kind": "candidate", "candidate": c, "seed": s, "val_acc": v}
            for c, s, v in (("a", 0, 60), ("b", 0, 70), ("b", 1, 50), ("a", 1, 60), ("c", 0, 99))]
    assert choose(rows, "m", "50", ["b", "a"], [0, 1]) == ("b", {"b": 60.0, "a": 60.0})
    assert choose(rows, "m", "50", ["a", "c"], [0, 1])[0] is None  # c lacks seed 1
    assert choose(rows, "m", "100", ["a"], [0])[0] is None


def test_interrupted_study_with_a_grid_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    def metrics(call):
        return {"val/acc": 0.5, "test/acc": 0.45} if call.validate else {"test/acc": 0.4}

    kd = {**KD, "grid": {"model.init_args.temperature": [1.0, 2.0]}}
    over = dict(methods=[STUDENT, kd], budgets=[20, 50], seeds=[0, 1])
    # per budget: 2 student runs and 4 candidate fits -> 12 runs in all, and 2 chosen rows per budget
    first = FakeRuns(metrics, interrupt_at=6)
    assert run_study(tmp_path, monkeypatch, first, **over) == 130
    assert "Rerun the same command to continue" in capsys.readouterr().err
    done = read_rows(tmp_path / "out")
    assert len(done) == 5
    second = FakeRuns(metrics)
    assert run_study(tmp_path, monkeypatch, second, **over) == 0
    assert len(second.calls) == 12 - 5  # nothing finished is trained again
    started_again = {tuple(c.args) for c in second.calls}
    assert not started_again & {tuple(c.args) for c in first.calls[:5]}
    assert tuple(first.calls[5].args) in started_again  # the interrupted run
    rows = read_rows(tmp_path / "out")
    assert rows[:5] == done and len(rows) == 16
    third = FakeRuns(metrics)
    assert run_study(tmp_path, monkeypatch, third, **over) == 0 and third.calls == []


def test_results_of_the_previous_csv_layout_are_resumed(tmp_path, monkeypatch):
    """A study folder written before grids existed (no kind/candidate/val_acc columns) resumes."""
    fake = FakeRuns()
    assert run_study(tmp_path, monkeypatch, fake, methods=[STUDENT], budgets=[20], seeds=[0]) == 0
    path = tmp_path / "out" / "results.csv"
    (row,) = read_rows(tmp_path / "out")
    old_fields = list(row)[:12]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(row)
    again = FakeRuns()
    assert run_study(tmp_path, monkeypatch, again, methods=[STUDENT], budgets=[20], seeds=[0, 1]) == 0
    assert [flag(c.args, "seed_everything") for c in again.calls] == ["1"]
    rows = read_rows(tmp_path / "out")
    assert [(r["seed"], r["kind"]) for r in rows] == [("0", ""), ("1", "run")]


def test_weights_digest_follows_the_weights_alone(tmp_path):
    """Two checkpoints of the same weights with other contents (paths, epochs) share a digest;
    one value changed in its last bit does not."""
    w = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.zeros(2),
         "bn.num_batches_tracked": torch.tensor(7), "empty": torch.zeros(0, 3, dtype=torch.float16)}
    torch.save({"state_dict": w, "epoch": 3, "callbacks": {"dirpath": "/one/place"}}, tmp_path / "x.ckpt")
    torch.save({"state_dict": {k: v.clone() for k, v in w.items()}, "epoch": 9}, tmp_path / "y.ckpt")
    torch.save(w, tmp_path / "plain.pt")
    bumped = {**w, "a.bias": torch.nextafter(torch.zeros(2), torch.ones(2))}
    torch.save({"state_dict": bumped}, tmp_path / "z.ckpt")
    same = {weights_digest(tmp_path / n) for n in ("x.ckpt", "y.ckpt", "plain.pt")}
    assert len(same) == 1 and weights_digest(tmp_path / "z.ckpt") not in same


def test_a_rerun_with_another_teacher_says_so_and_records_it(tmp_path, monkeypatch, capsys):
    """A study continued on another machine trains its teacher again; study.json records the
    teacher's weight digest, and a teacher with other weights is named in a warning."""
    over = dict(methods=[KD], budgets=[20])
    assert run_study(tmp_path, monkeypatch, FakeRuns(), **over, seeds=[0]) == 0
    first = json.loads((tmp_path / "out" / "study.json").read_text())["teacher"]["weights_sha256"]
    assert "another teacher" not in capsys.readouterr().out
    assert run_study(tmp_path, monkeypatch, FakeRuns(), **over, seeds=[0, 1]) == 0  # the cached teacher
    assert "another teacher" not in capsys.readouterr().out
    for p in (tmp_path / "t").rglob("teacher.*"):  # a new machine: no cached teacher
        p.unlink()
    assert run_study(tmp_path, monkeypatch, FakeRuns(teacher_weight=2.0), **over, seeds=[0, 1, 2]) == 0
    out = capsys.readouterr().out
    now = json.loads((tmp_path / "out" / "study.json").read_text())["teacher"]["weights_sha256"]
    assert now != first and f"another teacher (weights sha256 {first})" in out and now in out


class FakeRay:
    """Stands in for RayExecutor: keeps up to two runs submitted, finishes them first in, first
    out through ``jobs.run_job`` (a :class:`FakeRuns`), and says a run took
    ``seconds[method]``. ``events`` logs each submission and the teacher's training."""

    concurrent = True

    def __init__(self, seconds: dict[str, float], events: list[tuple[str, str]]) -> None:
        self.seconds, self.events, self.pending = seconds, events, []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        assert not self.pending, "nothing to cancel in a study that finishes"

    def describe(self) -> str:
        return "fake Ray"

    def room(self) -> int:
        return 2 - len(self.pending)

    def submit(self, plan) -> None:
        self.pending.append(plan)
        self.events.append(("submit", flag(plan.jobs[-1].args, "trainer.logger.init_args.name")))

    def results(self):
        while self.pending:
            plan = self.pending.pop(0)
            result = execute(plan.jobs)
            result.seconds = self.seconds[plan.run_dir.relative_to(plan.run_dir.parents[2]).parts[0]]
            yield plan, result


def test_parallel_study_starts_teacher_free_runs_first_and_longest_runs_early(tmp_path, monkeypatch):
    from kd_lightning.study.spec import load_study

    events: list[tuple[str, str]] = []
    fake = FakeRuns()

    def logged(job, on_epoch=None):
        if flag([str(a) for a in job.args], "trainer.logger.init_args.name") == "teacher":
            events.append(("teacher", ""))
        return fake(job, on_epoch)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(jobs, "run_job", logged)
    slow = {**KD, "name": "SlowKD"}
    spec = load_study(write_study(tmp_path, methods=[STUDENT, KD, slow]))
    ray_runs = FakeRay({"student_alone": 1.0, "ResponseKD": 1.0, "SlowKD": 10.0}, events)
    study = runner.StudyRunner(spec, tmp_path / "out", [], False, tmp_path / "t", progress=False,
                               executor=ray_runs)
    study.run()

    teacher_at = events.index(("teacher", ""))
    before = [name for kind, name in events[:teacher_at]]
    assert len(before) == 2 and all(n.startswith("student_alone/M50/") for n in before)
    order = [name for kind, name in events[teacher_at + 1:]]
    # one run of each method not started yet goes first, at the largest budget ...
    assert order[:2] == ["ResponseKD/M50/seed0", "SlowKD/M50/seed0"]
    # ... then the longest expected: ResponseKD's second run while SlowKD's first is still going
    # (assumed as slow as the slowest known), and once SlowKD is known to take 10x longer, all
    # its runs before the 1-second ones
    assert order[2:] == ["ResponseKD/M50/seed1", "SlowKD/M50/seed1", "SlowKD/M20/seed0",
                         "SlowKD/M20/seed1", "student_alone/M20/seed0", "student_alone/M20/seed1",
                         "ResponseKD/M20/seed0", "ResponseKD/M20/seed1"]
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 12 == len({(r["method"], r["M"], r["seed"]) for r in rows})
    # runs with a teacher got the study's teacher checkpoint, the student alone none
    for call in fake.calls:
        has_teacher = flag(call.args, "model.init_args.teacher_checkpoint") is not None
        assert has_teacher == (not flag(call.args, "trainer.logger.init_args.name")
                               .startswith("student_alone"))


def test_callbacks_a_method_adds_reach_its_runs(tmp_path, monkeypatch, capsys):
    """The study drops the callbacks of a method's config (no checkpoints, no progress bars) but
    keeps those its arguments add."""
    from kd_lightning.study.spec import run_parser

    fake = FakeRuns()
    kd = {**KD, "args": ["--trainer.callbacks+=pytorch_lightning.callbacks.LearningRateMonitor"]}
    assert run_study(tmp_path, monkeypatch, fake, methods=[STUDENT, kd], budgets=[20],
                     seeds=[0]) == 0
    callbacks = {flag(c.args, "trainer.logger.init_args.name").split("/")[0]:
                 [cb.class_path for cb in run_parser().parse_args(c.args[1:]).trainer.callbacks]
                 for c in fake.calls}
    assert callbacks == {"student_alone": [],
                         "ResponseKD": ["pytorch_lightning.callbacks.LearningRateMonitor"]}
