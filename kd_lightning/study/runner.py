"""Running a study: the teacher once, then every method x budget x seed (x grid candidate).

:meth:`StudyRunner.planned` enumerates the study's trainings, once, as :class:`RunPlan` s whose
jobs an executor runs (:mod:`~kd_lightning.study.executors`). Each finished run appends its row
to ``results.csv`` at once, so a rerun skips what is done; a run killed part-way continues from
its last finished epoch (:class:`kd_lightning.jobs.ResumePoint`). Grid candidates are measured on
the validation split and tested when they finish; once all are in, the best mean validation
accuracy over the seeds is chosen (:func:`~kd_lightning.study.results.choose`) and its test
accuracies become the reported ``chosen`` rows (no candidate's test accuracy takes part in the
choice). So a grid whose candidates ran on different machines, or whose weights are gone, needs
no retraining to report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

from kd_lightning import KDConfigError, environment, jobs
from kd_lightning.study.executors import SequentialExecutor
from kd_lightning.study.results import (CANDIDATE, CHOSEN, FAILED, RUN, Results, candidate_key,
                                        candidate_label, choose, run_key)
from kd_lightning.study.spec import (Budget, MethodSpec, StudySpec, budget_data_args, budget_label,
                                     override_args, require)

#: what a study writes into its output folder, and the curves benchmarks/validation_curves.py
#: --save keeps there (all that --overwrite may delete)
OWN_FILES = ("study.json", "results.csv", "results.md", "accuracy_vs_m.png", "runs", "curves.csv")
#: what a run's folder name keeps of a method or candidate name (the rest becomes "_")
_UNSAFE = re.compile(r"[^\w\-.=]")


def weights_digest(checkpoint: Path) -> str:
    """SHA-256 of a checkpoint's weights (each ``state_dict`` entry's name, dtype, shape and
    bytes, in order): equal for the same weights whatever else the file holds (paths, callback
    states), so a study can tell whether two machines' runs shared one teacher."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    h = hashlib.sha256()
    for name, tensor in state.get("state_dict", state).items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class RunPlan:
    """One training of the study (or the test of a chosen grid candidate), before it runs;
    ``needs_teacher``: it waits for the study's teacher checkpoint; ``weights``: a candidate's."""

    method: MethodSpec
    budget: Budget
    seed: int
    candidate: dict
    kind: str
    jobs: list
    epochs: int
    steps: int
    run_dir: Path
    needs_teacher: bool
    weights: Path

    @property
    def label(self) -> str:
        return budget_label(self.budget)

    @property
    def key(self) -> tuple:
        return self.method.name, self.label, self.seed, self.kind, candidate_key(self.candidate)

    def describe(self) -> str:
        extra = f" {candidate_label(self.candidate)}" if self.candidate else ""
        return f"{self.method.name} M={self.label} seed={self.seed}{extra}"


class Queue:
    """Runs not started yet, in study order or ``longest_first`` (a parallel study's order: LPT
    scheduling, so no worker idles at the end while one long run finishes). A run's expected
    length: seconds per step of its method at its budget (else at the method's slowest budget so
    far) x its steps; a method not started yet comes first (one run measures it), one whose first
    run is still going counts as the slowest so far. Ties: the larger budget, then study order."""

    def __init__(self, longest_first: bool) -> None:
        self.plans: list[RunPlan] = []
        self.longest_first = longest_first
        self._rate: dict[tuple[str, str], float] = {}  # (method, budget) -> seconds per step
        self._slowest: dict[str, float] = {}  # method -> its slowest budget's seconds per step
        self._started: set[str] = set()

    def extend(self, plans) -> None:
        self.plans.extend(plans)
        if self.longest_first:  # larger budgets first among equals: a step costs as much there
            self.plans.sort(key=lambda p: -(math.inf if p.budget is None else p.budget))

    def observe(self, plan: RunPlan, seconds: float) -> None:
        name, rate = plan.method.name, seconds / max(plan.steps, 1)
        self._rate[(name, plan.label)] = rate
        self._slowest[name] = max(rate, self._slowest.get(name, 0.0))

    def estimate(self, plan: RunPlan) -> float:
        """Expected seconds of ``plan`` (``inf`` for a method not started yet)."""
        name = plan.method.name
        rate = self._rate.get((name, plan.label), self._slowest.get(name))
        if rate is None and name not in self._started:
            return math.inf
        return (max(self._slowest.values(), default=0.0) if rate is None else rate) * plan.steps

    def pop(self) -> RunPlan:
        plan = self.plans.pop(max(range(len(self.plans)), key=lambda i: (self.estimate(self.plans[i]), -i))
                              if self.longest_first else 0)
        self._started.add(plan.method.name)
        return plan


class _Display:
    """Bars for the teacher's epochs and the runs (rich, unless ``--no-progress``), and a line
    per finished run."""

    def __init__(self, enabled: bool) -> None:
        from rich import progress as rp
        from rich.console import Console

        # bound now: in-process runs redirect sys.stdout into their logs
        self.console, self.tasks = Console(file=sys.stdout, highlight=False), {}
        self.bar = rp.Progress(rp.TextColumn("[bold]{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                               rp.TextColumn("elapsed"), rp.TimeElapsedColumn(), rp.TextColumn("left"),
                               rp.TimeRemainingColumn(), console=self.console) if enabled else None

    def print(self, line: str) -> None:
        self.console.print(line, markup=False, soft_wrap=True)

    def show(self, task: str, **fields) -> None:
        """Update bar ``task`` (add it, if ``fields`` give its total)."""
        if self.bar is not None and task in self.tasks:
            self.bar.update(self.tasks[task], **fields)
        elif self.bar is not None and "total" in fields:
            self.tasks[task] = self.bar.add_task(**fields)

    def teacher_epoch(self, event: dict) -> None:
        epoch, total = event["epoch"], event["max_epochs"]
        val = "" if event.get("val_acc") is None else f", val acc {100 * event['val_acc']:.2f}%"
        self.show("teacher", completed=epoch, total=total, description=f"teacher epoch {epoch}/{total}{val}")
        if self.bar is None and (epoch in (1, total) or epoch % max(1, total // 10) == 0):
            self.print(f"teacher: epoch {epoch}/{total}{val}")

    def finished(self, line: str) -> None:
        self.print(line)
        self.show("runs", advance=1)


class StudyRunner:
    """Trains a study's runs into ``output`` (results.csv, study.json, runs/), one after another
    or on the ``executor`` given (:class:`kd_lightning.study.executors.RayExecutor`)."""

    def __init__(self, spec: StudySpec, output: Path, trainer_args: list[str], overwrite: bool,
                 teacher_cache: Path, progress: bool = True, keep_going: bool = True, executor=None,
                 resume_every: float = 60.0) -> None:
        self.spec, self.output, self.trainer_args = spec, Path(output), list(trainer_args)
        #: seconds between a run's resume checkpoints (:class:`kd_lightning.jobs.ResumePoint`)
        self.resume_every = resume_every
        self.executor = executor or SequentialExecutor()
        #: keep_going: on a failed run (diverged, crashed) record it as failed and go on
        self.overwrite, self.progress, self.keep_going = overwrite, progress, keep_going
        self.study_hash, self.teacher_acc, self._sizes, self._teacher = spec.hash(), None, {}, {}
        #: the distinct environments the study's runs reported (kept in study.json across reruns)
        self.environments: list[dict] = []
        self.results = Results(self.output / "results.csv", self.study_hash)
        key = hashlib.sha256((Path(spec.resolve(spec.teacher_config)).read_text()
                              + json.dumps(spec.teacher_args) + json.dumps(self.trainer_args)).encode())
        #: the teacher's cache folder: one per configuration, so later studies reuse it
        self.teacher_dir = Path(teacher_cache) / key.hexdigest()[:16]
        self.teacher_ckpt = self.teacher_dir / "teacher.ckpt"

    # ---- output folder and teacher -----------------------------------------------------------
    def prepare_output(self) -> None:
        """Use the output folder: new, empty, or holding this study's results (resumed: the earlier
        runs' environments and the teacher stay); with ``--overwrite`` another study's loses
        exactly the files a study writes (:data:`OWN_FILES`)."""
        jobs.claim_output(self.output, "study.json", self.study_hash, OWN_FILES, self.overwrite,
                          "study", "results of a different study")
        meta = self.output / "study.json"  # now absent or this study's: claim_output deleted another's
        old = json.loads(meta.read_text()) if meta.is_file() else {}
        self.environments = list(old.get("run_environments") or [])
        self._teacher = {k: v for k, v in old.items() if k == "teacher"}
        self._write_meta()

    def _write_meta(self) -> None:
        """study.json: the study's hash and identity, the teacher, this process's environment and
        the distinct environments its runs reported (float32 results depend on them)."""
        meta = {"hash": self.study_hash, "identity": self.spec.identity(),
                "environment": environment.describe(), "run_environments": self.environments}
        (self.output / "study.json").write_text(json.dumps({**meta, **self._teacher}, indent=2))

    def prepare_teacher(self, display: _Display) -> None:
        """The study's teacher: from the cache, or trained now (and cached by configuration)."""
        spec, folder, info = self.spec, self.teacher_dir, self.teacher_dir / "teacher.json"
        if not (self.teacher_ckpt.is_file() and info.is_file()):
            folder.mkdir(parents=True, exist_ok=True)
            cfg = spec.resolve(spec.teacher_config)
            job = jobs.Job(["fit", "--config", cfg, *spec.teacher_args, "--trainer.logger.init_args.save_dir",
                            str(folder), "--trainer.logger.init_args.name", "teacher",
                            "--trainer.enable_progress_bar", "false", *self.trainer_args,
                            "--trainer.callbacks+=kd_lightning.jobs.EpochProgress"],
                           folder / "teacher.log", jobs.needs_subprocess(spec.teacher_run_config))
            epochs = spec.teacher_run_config.trainer.max_epochs
            display.print(f"training the teacher ({spec.teacher_config}, {epochs or '?'} epochs); it is cached for "
                          f"later studies")
            display.show("teacher", description="teacher", total=epochs)
            try:
                result = jobs.run_job(job, display.teacher_epoch)
            except jobs.JobFailed as err:
                raise KDConfigError(f"the teacher run failed ({err}); see {job.log}. The study trains its teacher "
                                    f"from {spec.teacher_config} (teacher: in {spec.path}) with the arguments "
                                    f"{[*spec.teacher_args, *self.trainer_args]}. Results already written "
                                    f"are kept.") from None
            found = [Path(p) for p in result.checkpoints if Path(p).is_file()]
            best = [p for p in found if p.name.startswith("best")] or found
            require(best, f"the teacher run wrote no checkpoint (config {spec.teacher_config}, teacher: in "
                    f"{spec.path}); give it a ModelCheckpoint callback.")
            shutil.copyfile(best[0], self.teacher_ckpt)
            info.write_text(json.dumps({"config": cfg, "args": spec.teacher_args,
                                        "source": str(best[0]), "test_acc": result.metrics.get("test/acc")}))
        self.teacher_acc = json.loads(info.read_text()).get("test_acc")
        digest = weights_digest(self.teacher_ckpt)  # from the file itself (tens of ms), never cached apart from it
        earlier = self._teacher.get("teacher", {}).get("weights_sha256")
        if earlier not in (None, digest):
            display.print(f"warning: this study's earlier runs in {self.output} were trained with another teacher "
                          f"(weights sha256 {earlier}) than {self.teacher_ckpt} (sha256 {digest}), e.g. one "
                          f"trained again on another machine. New rows use this one; to keep one teacher, put "
                          f"the earlier checkpoint at {self.teacher_ckpt} and rerun.")
        self._teacher = {"teacher": {"config": spec.teacher_config, "checkpoint": str(self.teacher_ckpt),
                                     "test_acc": self.teacher_acc, "weights_sha256": digest}}
        self._write_meta()

    # ---- planning ----------------------------------------------------------------------------
    def _steps_per_epoch(self, run_config, budget: Budget, seed: int) -> int:
        """Optimizer steps per epoch of a run, from its data module (built once per data)."""
        from kd_lightning.data import DistillDataModule

        data = {**run_config.data.as_dict(), **budget_data_args(self.spec.budget_unit, budget), "subset_seed": seed}
        key = json.dumps(data, sort_keys=True, default=str)
        if key not in self._sizes:
            dm = DistillDataModule(**data)  # raises KDConfigError for an impossible budget
            n = len(dm.train_indices)
            self._sizes[key] = n // dm.batch_size if dm.drop_last else math.ceil(n / dm.batch_size)
        return self._sizes[key]

    def plan(self, method: MethodSpec, budget: Budget, seed: int, candidate: dict, kind: str) -> RunPlan:
        """One training: its ``kd-lightning fit`` arguments and its length. ``CHOSEN``: the test
        of a chosen candidate's weights, for a candidate row written without a test accuracy;
        trained again first if the weights were removed (the same run gives the same weights)."""
        if kind == CHOSEN:
            fit = self.plan(method, budget, seed, candidate, CANDIDATE)
            test = jobs.Job(["test", *fit.jobs[0].args[1:], "--trainer.logger.init_args.version", "test",
                             "--ckpt_path", str(fit.weights)], fit.run_dir / "test.log", fit.jobs[0].isolate)
            return dataclasses.replace(fit, kind=CHOSEN, jobs=([] if fit.weights.is_file() else fit.jobs) + [test])
        spec, label = self.spec, budget_label(budget)
        settings = {**spec.settings(method, budget), **candidate}
        config = spec.run_config(method, settings)
        try:
            per_epoch = self._steps_per_epoch(config, budget, seed)
        except KDConfigError as err:
            raise KDConfigError(f"budget M={label} cannot be run for method '{method.name}': {err}") from None
        unit, n = spec.length(budget)
        epochs = n if unit == "epochs" else max(1, round(n / max(per_epoch, 1)))
        name = f"{_UNSAFE.sub('_', method.name)}/M{label}/seed{seed}"
        if candidate:
            name += "/" + _UNSAFE.sub("_", candidate_label(candidate).replace(", ", "_"))
        run_dir, fractions = self.output / "runs" / name, {**spec.epoch_args, **method.epoch_args}
        needs_teacher = config.model.init_args.get("teacher") is not None
        # the config's callbacks are dropped first, so callbacks the study's or the method's
        # arguments add (--trainer.callbacks+=...) reach the run; no validation unless those
        # arguments turn it on (e.g. --trainer.limit_val_batches=0.25 for validation curves)
        args = ["fit", "--config", spec.resolve(method.config), "--trainer.callbacks", "[]",
                "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", *spec.args,
                *method.args, *override_args(settings), "--seed_everything", str(seed),
                *override_args({f"data.{k}": v for k, v in budget_data_args(spec.budget_unit, budget).items()}),
                "--data.subset_seed", str(seed), "--trainer.max_epochs", str(epochs), "--trainer.max_steps", "-1",
                "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir",
                str(self.output / "runs"), "--trainer.logger.init_args.name", name,
                "--test_after_fit", "true",
                *(["--model.init_args.teacher_checkpoint", str(self.teacher_ckpt)] if needs_teacher else []),
                *override_args({k: max(1, round(f * epochs)) for k, f in fractions.items() if k in method.run_config}),
                *self.trainer_args]
        weights = run_dir / "final.ckpt"
        job = jobs.Job(args, run_dir / "run.log", jobs.needs_subprocess(config), validate=kind == CANDIDATE,
                       save_weights=weights if kind == CANDIDATE else None, resume=run_dir / "resume",
                       resume_every=self.resume_every)
        return RunPlan(method, budget, seed, candidate, kind, [job], epochs, epochs * per_epoch, run_dir,
                       needs_teacher, weights)

    def planned(self) -> list[RunPlan]:
        """Every training of the study, in study order (budget, method, candidate, seed); the
        tests of chosen grid candidates follow from these (:meth:`_grid_done`)."""
        spec = self.spec
        return [self.plan(m, b, s, c, CANDIDATE if m.grid else RUN) for b in spec.budgets for m in spec.methods
                for c in spec.candidates(m, b) for s in spec.seeds]

    @staticmethod
    def _is_done(plan: RunPlan, done: set) -> bool:  # CHOSEN: whichever candidate was chosen
        return any(k[:4] == plan.key[:4] for k in done) if plan.kind == CHOSEN else plan.key in done

    # ---- running -----------------------------------------------------------------------------
    def run(self) -> None:
        """Train (or skip, if done) every run of the study; writes results.csv and study.json."""
        plans = self.planned()  # checks that every budget can be drawn, before anything is written
        self.prepare_output()
        grids = {(p.method.name, p.label): p for p in plans if p.kind == CANDIDATE}
        done = self.results.done()
        todo = [p for p in plans if not self._is_done(p, done)]
        ex, stop, display = self.executor, None, _Display(self.progress)
        for line in self.results.damaged({p.key[:3] for p in plans}, done):
            display.print(line)
        queue = Queue(longest_first=ex.concurrent)

        def fill() -> None:
            while queue.plans and ex.room() > 0:
                plan = queue.pop()
                display.show("runs", description=plan.describe())
                ex.submit(plan)

        with display.bar or contextlib.nullcontext(), ex:
            if ex.concurrent:  # the runs that need no teacher start while it trains
                display.print(ex.describe())
                queue.extend(p for p in todo if not p.needs_teacher)
                fill()
            self.prepare_teacher(display)
            queue.extend(p for p in todo if p.needs_teacher or not ex.concurrent)
            total = len(plans) + len(grids) * len(self.spec.seeds)
            finished = len(plans) - len(todo) + sum(any(k[:4] == (*g, s, CHOSEN) for k in done)
                                                    for g in grids for s in self.spec.seeds)
            display.show("runs", description=f"{total - finished} runs", total=total, completed=finished)
            for plan in grids.values():
                queue.plans[:0] = self._grid_done(plan, display)
            fill()
            for plan, outcome in ex.results():
                if isinstance(outcome, jobs.JobFailed):
                    hint = (f" The study's teacher is trained from {self.spec.teacher_config} (teacher: in "
                            f"{self.spec.path}) and cached at {self.teacher_ckpt}."
                            if "teacher" in str(outcome).lower() else "")
                    # the log of the job that failed (a worker killed mid-run says not which: the last started)
                    tried = [j.log for j in reversed(plan.jobs) if Path(j.log).exists()]
                    log = outcome.log or (tried or [plan.jobs[0].log])[0]
                    err = jobs.JobFailed(f"run {plan.describe()} failed: {outcome} (log: {log}).{hint} Finished runs "
                                         f"are kept in {self.results.path}; rerun the same command to continue.")
                    if not self.keep_going:
                        raise err
                    if plan.kind == RUN:
                        self._row(plan, 0.0, {}, kind=FAILED, error=" ".join(str(err).split())[:2000])
                        display.finished(f"{plan.describe()}: FAILED, recorded as failed (not a result); the study "
                                         f"goes on. {err}")
                    else:  # a grid's choice needs every candidate
                        stop = stop or err
                else:
                    self._record(plan, outcome, display)
                    if plan.kind != CHOSEN:
                        queue.observe(plan, outcome.seconds)
                    if plan.kind != RUN:
                        queue.plans[:0] = self._grid_done(plan, display)
                fill()
        if stop is not None:
            raise stop

    def _grid_done(self, plan: RunPlan, display: _Display) -> list[RunPlan]:
        """After a run of ``plan``'s grid, once every candidate is in: the chosen candidate's rows,
        from the test each candidate ran when it finished (test jobs on its weights, returned to
        start, for rows written without one); once those are in, the other candidates' weights
        are deleted."""
        spec, method, budget = self.spec, plan.method, plan.budget
        candidates = spec.candidates(method, budget)
        keys = [candidate_key(c) for c in candidates]
        chosen, _ = choose(self.results.rows(), method.name, plan.label, keys, spec.seeds)
        if chosen is None:
            return []
        best, done = candidates[keys.index(chosen)], self.results.done()
        tests = [t for t in (self.plan(method, budget, s, best, CHOSEN) for s in spec.seeds)
                 if not self._is_done(t, done)]
        rows = self.results.rows()
        for test in [t for t in tests if self._candidate_row(rows, t)["test_acc"] != ""]:
            self._record_chosen(test, 0.0, {}, rows, display)  # tested when it was trained
            tests.remove(test)
        if not tests:
            for c in candidates:
                for s in spec.seeds if c is not best else ():
                    self.plan(method, budget, s, c, CANDIDATE).weights.unlink(missing_ok=True)
        return [] if plan.kind == CHOSEN else tests

    def _row(self, plan: RunPlan, seconds: float, metrics: dict, **values) -> dict:
        pct = {col: round(100 * metrics[k], 3) if k in metrics else "" for col, k in
               (("test_acc", "test/acc"), ("teacher_acc", "test/teacher_acc"), ("val_acc", "val/acc"))}
        row = {"study_hash": self.study_hash, "method": plan.method.name, "M": plan.label, "seed": plan.seed,
               "epochs": plan.epochs, "steps": plan.steps, "wall_time_s": round(seconds, 2),
               "run_hash": hashlib.sha256(json.dumps(plan.jobs[0].args[2:]).encode()).hexdigest()[:12],
               "run_dir": str(plan.run_dir), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "kind": plan.kind,
               "candidate": candidate_key(plan.candidate), **pct, **values}
        self.results.append(row)
        return row

    def _record(self, plan: RunPlan, result: jobs.JobResult, display: _Display) -> None:
        if result.environment and result.environment not in self.environments:
            self.environments.append(result.environment)
            self._write_meta()
        what = f"{result.seconds:.0f} s, {plan.epochs} epochs" + (
            f", resumed after epoch {result.resumed_epochs}" if result.resumed_epochs else "")
        if plan.kind != CHOSEN:
            row = self._row(plan, result.seconds, result.metrics)
            return display.finished(f"{plan.describe()}: test acc {row['test_acc']:.2f}% ({what})"
                                    if plan.kind == RUN else
                                    f"{plan.describe()}: val acc {row['val_acc']:.2f}% ({what}; a candidate)")
        self._record_chosen(plan, result.seconds, result.metrics, self.results.rows(), display)

    @staticmethod
    def _candidate_row(rows: list[dict], plan: RunPlan) -> dict:
        """The row of the candidate run whose weights ``plan`` (kind ``chosen``) reports."""
        return next(r for r in rows if run_key(r) == (*plan.key[:3], CANDIDATE, plan.key[4]))

    def _record_chosen(self, plan: RunPlan, seconds: float, metrics: dict, rows: list[dict],
                       display: _Display) -> None:
        """The ``chosen`` row of ``plan``: the candidate's own test accuracy (``metrics`` empty), or
        that of the test job just run on its weights (a candidate row written without one)."""
        fit, key = self._candidate_row(rows, plan), plan.key[4]
        tested = {} if metrics else {k: fit[k] for k in ("test_acc", "teacher_acc")}
        row = self._row(plan, seconds + float(fit["wall_time_s"]), metrics, val_acc=fit["val_acc"],
                        run_hash=fit["run_hash"], **tested)
        keys = [candidate_key(c) for c in self.spec.candidates(plan.method, plan.budget)]
        means = choose(rows, plan.method.name, plan.label, keys, self.spec.seeds)[1]
        others = "".join(f"; {candidate_label(k)}: {m:.2f}%" for k, m in means.items() if k != key)
        display.finished(
            f"{plan.method.name} M={plan.label} seed={plan.seed}: {candidate_label(plan.candidate)} chosen "
            f"(mean val acc {means[key]:.2f}%{others}), test acc {float(row['test_acc']):.2f}%")
