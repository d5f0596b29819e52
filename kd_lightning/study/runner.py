"""Running a study: the teacher once, then every method x budget x seed (x grid candidate).

Every training goes through :func:`kd_lightning.study.child.run`, the same path as
``kd-lightning fit``; its arguments are built by :meth:`StudyRunner.plan` from the method's
parsed configuration. Each finished run appends one row to ``results.csv`` (flushed to disk at
once), so a rerun of the same study skips what is done.

A method with a ``grid`` is trained once per candidate and seed, without testing; each run's
final weights are measured on the validation split and kept. When every candidate has its
runs, the candidate with the best mean validation accuracy over the seeds is chosen
(:func:`kd_lightning.study.results.choose`) and only its weights are tested.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import kd_lightning
from kd_lightning import KDConfigError
from kd_lightning.study.results import (CANDIDATE, CHOSEN, FAILED, RUN, Results,
                                        candidate_key,
                                        candidate_label, choose)
from kd_lightning.study.spec import Budget, MethodSpec, StudySpec, budget_label, override_args

#: the callback that reports the teacher's epochs (kd_lightning.study.child)
EPOCH_PROGRESS = "kd_lightning.study.child.EpochProgress"


def delete_own_files(folder: Path, paths: list[Path]) -> None:
    """``--overwrite``: delete ``paths`` (files or folders a tool wrote into ``folder``), never
    ``folder`` itself, and nothing at all when ``folder`` is the working folder, one of its
    parents, home or a root."""
    where = Path(folder).resolve()
    cwd = Path.cwd().resolve()
    if where in {cwd, Path.home().resolve(), Path(where.anchor)} or where in cwd.parents:
        raise KDConfigError(
            f"--overwrite refuses to delete results in {folder} (the working folder, one of its "
            f"parents, home or a root); give the run its own folder with --output.")
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class RunFailed(Exception):
    """A training of the study failed (the rows of finished runs are kept)."""


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached a run: the study stops (the run is not recorded, so a rerun
    trains it again); ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


#: exit statuses of a run stopped by SIGINT / SIGTERM (the CLI's 130 / 143, or the signal itself)
_INTERRUPTED = {130: 130, -signal.SIGINT: 130, 143: 143, -signal.SIGTERM: 143}


# ------------------------------------------------------------------------------------------
# one run


def needs_subprocess(run_config) -> bool:
    """Whether a run starts several processes (DDP re-launches the command that started it)."""
    trainer = run_config.trainer
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else \
        getattr(trainer.strategy, "class_path", str(trainer.strategy))
    devices = trainer.devices
    if isinstance(devices, str) and devices != "auto":  # "2", "-1" or a list "0,1"
        items = [d for d in devices.split(",") if d.strip()]
        devices = items if "," in devices or not devices.strip().lstrip("-").isdigit() \
            else int(devices)
    if devices == "auto":
        many = trainer.accelerator != "cpu"  # "auto" takes every GPU there is
    elif isinstance(devices, int):
        many = devices > 1 or devices == -1
    else:
        many = len(devices) > 1
    return "ddp" in str(strategy).lower() or (trainer.num_nodes or 1) > 1 or many


def _error_lines(text: str) -> str:
    """What a failed run said: its one-line configuration error, or its last lines."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kd-lightning: error:")]
    if errors:
        return errors[-1][len("kd-lightning: error:"):].strip()
    return " / ".join(lines[-3:])


def run_kd_lightning(args: list[str], log_file: Path, isolate: bool, *, validate: bool = False,
                     save_weights: Path | None = None,
                     on_epoch: Callable[[dict], None] | None = None) -> dict[str, float]:
    """One ``kd-lightning`` run (see :func:`kd_lightning.study.child.run`), its output written to
    ``log_file``; in a subprocess if ``isolate``. Raises :class:`RunFailed`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    weights = None if save_weights is None else str(save_weights)
    if isolate:
        return _run_subprocess(args, log_file, validate, weights, on_epoch)
    from kd_lightning.study import child

    buffer = io.StringIO()
    # Lightning answers Ctrl-C during fit with a graceful stop and exit status 1, which alone is
    # not told apart from a failure: a handler of ours notes the signal first
    sigints: list[int] = []

    def on_sigint(signum, frame):
        sigints.append(signum)
        raise KeyboardInterrupt

    # (a process that ignores SIGINT, e.g. started in the background, keeps ignoring it)
    previous = None if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else _set_sigint(on_sigint)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return child.run(args, validate=validate, save_weights=weights, on_epoch=on_epoch)
    except SystemExit as exc:  # argument or configuration error inside the run, or a signal
        if sigints:
            raise StudyInterrupted(130) from None
        if exc.code == 143:  # SIGTERM (pre-emption): the CLI's exit status
            raise StudyInterrupted(143) from None
        raise RunFailed(f"exit status {exc.code}: {_error_lines(buffer.getvalue())}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the training itself
        buffer.write(traceback.format_exc())
        raise RunFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        if previous is not None:
            _set_sigint(previous)
        log_file.write_text(buffer.getvalue())


def _set_sigint(handler):
    """Install a SIGINT handler; returns the previous one (``None`` off the main thread, where
    signals cannot be handled, e.g. inside a Ray worker's task thread)."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None


def _run_subprocess(args, log_file, validate, weights, on_epoch) -> dict[str, float]:
    metrics_file = log_file.with_suffix(".metrics.json")
    progress_file = log_file.with_suffix(".progress.jsonl")
    for stale in (metrics_file, progress_file):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "kd_lightning.study.child", "--metrics", str(metrics_file)]
    if on_epoch is not None:
        cmd += ["--progress", str(progress_file)]
    if validate:
        cmd.append("--validate")
    if weights:
        cmd += ["--save-weights", weights]
    cmd += ["--", *args]
    # the subprocess imports this same kd_lightning, wherever it was imported from
    here = str(Path(kd_lightning.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    seen = 0
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    code = None
                if on_epoch is not None and progress_file.is_file():
                    lines = progress_file.read_text().splitlines()
                    for line in lines[seen:]:
                        on_epoch(json.loads(line))
                    seen = len(lines)
                if code is not None:
                    break
        except BaseException:
            proc.kill()
            raise
    if code in _INTERRUPTED:
        raise StudyInterrupted(_INTERRUPTED[code])
    if code != 0 or not metrics_file.is_file():
        raise RunFailed(f"exit status {code}: {_error_lines(log_file.read_text())}")
    return json.loads(metrics_file.read_text())


# ------------------------------------------------------------------------------------------
# the study


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


@dataclass
class RunPlan:
    """Everything about one training of the study, before it runs."""

    method: MethodSpec
    budget: Budget
    seed: int
    candidate: dict
    kind: str
    args: list[str]
    epochs: int
    steps: int
    run_dir: Path
    isolate: bool
    key: tuple = field(default=())
    #: whether the run distils from the study's teacher (it waits for the teacher checkpoint)
    needs_teacher: bool = True

    @property
    def label(self) -> str:
        return budget_label(self.budget)

    @property
    def weights(self) -> Path:
        return self.run_dir / "final.ckpt"

    def describe(self) -> str:
        extra = f" {candidate_label(self.candidate)}" if self.candidate else ""
        return f"{self.method.name} M={self.label} seed={self.seed}{extra}"


class LongestFirst:
    """The order in which a parallel study starts its runs: the longest expected run first.

    Starting the longest jobs first (LPT scheduling) keeps the runs left at the end short, so no
    worker idles while one long run finishes. A run's length is estimated from the runs already
    finished, as seconds per optimizer step of its method at its budget (else the method's
    slowest budget so far) times its steps. A method none of whose runs has started yet comes
    first (one run of it measures its cost); one whose first run is still going is assumed as
    slow as the slowest method so far. Ties go to the larger budget, then study order.
    """

    def __init__(self, plans) -> None:
        self.plans: list[RunPlan] = []
        self._rate: dict[tuple[str, str], float] = {}  # (method, budget) -> seconds per step
        self._slowest: dict[str, float] = {}  # method -> its slowest budget's seconds per step
        self._started: set[str] = set()
        self.extend(plans)

    def __bool__(self) -> bool:
        return bool(self.plans)

    def extend(self, plans) -> None:
        self.plans.extend(plans)
        # larger budgets first among equals: a step there costs at least as much
        self.plans.sort(key=lambda p: -(math.inf if p.budget is None else p.budget))

    def observe(self, plan: RunPlan, seconds: float) -> None:
        """A run finished in ``seconds``."""
        name, rate = plan.method.name, seconds / max(plan.steps, 1)
        self._rate[(name, plan.label)] = rate
        self._slowest[name] = max(rate, self._slowest.get(name, 0.0))

    def estimate(self, plan: RunPlan) -> float:
        """Expected seconds of ``plan`` (``inf`` for a method not started yet)."""
        name = plan.method.name
        rate = self._rate.get((name, plan.label), self._slowest.get(name))
        if rate is None:
            if name not in self._started:
                return math.inf
            rate = max(self._slowest.values(), default=0.0)
        return rate * plan.steps

    def pop(self) -> RunPlan:
        """The run to start next (removed from the queue)."""
        best = max(range(len(self.plans)), key=lambda i: (self.estimate(self.plans[i]), -i))
        plan = self.plans.pop(best)
        self._started.add(plan.method.name)
        return plan


class _Display:
    """The study on the terminal: bars for the teacher's epochs and for the runs (rich), and a
    line per finished run. Without bars (``progress=False``) the lines are printed alone."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console

        self.enabled = enabled
        # bound now: in-process runs redirect sys.stdout into their logs
        self.console = Console(file=sys.stdout, highlight=False)
        self.bar = None
        self.teacher_task = self.runs_task = None

    def __enter__(self) -> "_Display":
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                                TextColumn("left"), TimeRemainingColumn(), console=self.console)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def print(self, line: str) -> None:
        self.console.print(line, markup=False, soft_wrap=True)

    def teacher_starts(self, config: str, epochs: int | None) -> None:
        self.print(f"training the teacher ({config}, {epochs or '?'} epochs); it is cached for "
                   f"later studies")
        if self.bar is not None:
            self.teacher_task = self.bar.add_task("teacher", total=epochs)

    def teacher_epoch(self, event: dict) -> None:
        epoch, total = event["epoch"], event["max_epochs"]
        val = "" if event.get("val_acc") is None else f", val acc {100 * event['val_acc']:.2f}%"
        if self.bar is not None:
            self.bar.update(self.teacher_task, completed=epoch, total=total,
                            description=f"teacher epoch {epoch}/{total}{val}")
        elif epoch in (1, total) or epoch % max(1, total // 10) == 0:
            self.print(f"teacher: epoch {epoch}/{total}{val}")

    def runs(self, total: int, done: int) -> None:
        if self.bar is not None:
            self.runs_task = self.bar.add_task("runs", total=total, completed=done)

    def starting(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.runs_task, description=what)

    def finished(self, line: str) -> None:
        self.print(line)
        if self.bar is not None:
            self.bar.advance(self.runs_task)


class StudyRunner:
    """Trains a study's runs into ``output`` (results.csv, study.json, runs/)."""

    def __init__(self, spec: StudySpec, output: Path, trainer_args: list[str], overwrite: bool,
                 teacher_cache: Path, progress: bool = True, keep_going: bool = True,
                 runs=None) -> None:
        self.spec, self.output, self.trainer_args = spec, Path(output), list(trainer_args)
        #: where runs execute: None in this process, one after another; or a
        #: :class:`kd_lightning.study.parallel.RayRuns`, several at once as Ray tasks
        self.runs = runs
        #: on a failed run (diverged, crashed): record it as failed and go on, or stop the study
        self.keep_going = keep_going
        self.overwrite, self.teacher_cache, self.progress = overwrite, Path(teacher_cache), progress
        self.study_hash = spec.hash()
        self.results = Results(self.output / "results.csv", self.study_hash)
        self.teacher_acc: float | None = None
        self._teacher_ckpt: Path | None = None
        self._sizes: dict[str, tuple[int, int]] = {}

    # ---- output folder ------------------------------------------------------------------
    #: what a study writes into its output folder (all that --overwrite may delete)
    OWN_FILES = ("study.json", "results.csv", "results.md", "accuracy_vs_m.png", "runs")

    def prepare_output(self) -> None:
        """Use the output folder: empty, new, or holding this study's results (resumed). With
        ``--overwrite``, a folder holding another study's results loses exactly the files a study
        writes (:attr:`OWN_FILES`); anything else in it stays. A folder that is not a study's is
        never deleted, nor the working folder, home or a file-system root."""
        meta = self.output / "study.json"
        if self.output.exists() and not self.output.is_dir():
            raise KDConfigError(f"output {self.output} is a file, not a folder; give --output a "
                                f"folder for the study's results.")
        if self.output.exists() and any(self.output.iterdir()):
            old = json.loads(meta.read_text()).get("hash") if meta.is_file() else None
            if old is None:
                raise KDConfigError(
                    f"output folder {self.output} is not empty and holds no study results (no "
                    f"study.json); a study never writes into or deletes such a folder. Give "
                    f"--output a new or empty folder.")
            if old != self.study_hash:
                if not self.overwrite:
                    raise KDConfigError(
                        f"output folder {self.output} holds results of a different study (hash "
                        f"{old}); this study's hash is {self.study_hash}. Pass --overwrite to "
                        f"replace those results (only the files a study writes are deleted), "
                        f"--output DIR to write elsewhere, or rerun the original study config "
                        f"to resume it.")
                self._delete_study_files()
        self.output.mkdir(parents=True, exist_ok=True)
        self._write_meta()

    def _delete_study_files(self) -> None:
        delete_own_files(self.output, [self.output / name for name in self.OWN_FILES])

    def _write_meta(self, teacher: dict | None = None) -> None:
        meta = {"hash": self.study_hash, "identity": self.spec.identity()}
        if teacher is not None:
            meta["teacher"] = teacher
        (self.output / "study.json").write_text(json.dumps(meta, indent=2))

    # ---- teacher --------------------------------------------------------------------------
    def teacher_checkpoint(self, display: _Display | None = None) -> tuple[Path, float | None]:
        """The study's teacher: from the cache, or trained now (and cached by configuration)."""
        spec = self.spec
        cfg = spec.resolve(spec.teacher_config)
        key = hashlib.sha256((Path(cfg).read_text() + json.dumps(spec.teacher_args)
                              + json.dumps(self.trainer_args)).encode()).hexdigest()[:16]
        folder = self.teacher_cache / key
        ckpt, info = folder / "teacher.ckpt", folder / "teacher.json"
        if ckpt.is_file() and info.is_file():
            return ckpt, json.loads(info.read_text()).get("test_acc")
        folder.mkdir(parents=True, exist_ok=True)
        args = ["fit", "--config", cfg, *spec.teacher_args,
                "--trainer.logger.init_args.save_dir", str(folder),
                "--trainer.logger.init_args.name", "teacher",
                "--trainer.enable_progress_bar", "false", *self.trainer_args,
                f"--trainer.callbacks+={EPOCH_PROGRESS}"]
        log = folder / "teacher.log"
        if display is not None:
            display.teacher_starts(spec.teacher_config, spec.teacher_run_config.trainer.max_epochs)
        try:
            metrics = run_kd_lightning(args, log, needs_subprocess(spec.teacher_run_config),
                                       on_epoch=display.teacher_epoch if display else None)
        except RunFailed as err:
            raise KDConfigError(
                f"the teacher run failed ({err}); see {log}. The study trains its teacher from "
                f"{spec.teacher_config} (teacher: in {spec.path}) with the arguments "
                f"{[*spec.teacher_args, *self.trainer_args]}. Results already written are "
                f"kept.") from None
        best = self._find_teacher_ckpt(folder)
        shutil.copyfile(best, ckpt)
        info.write_text(json.dumps({"config": cfg, "args": spec.teacher_args,
                                    "test_acc": metrics.get("test/acc"), "source": str(best)}))
        return ckpt, metrics.get("test/acc")

    def _find_teacher_ckpt(self, folder: Path) -> Path:
        found = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        for callback in self.spec.teacher_run_config.trainer.callbacks or []:
            dirpath = (getattr(callback, "init_args", None) or {}).get("dirpath")
            if dirpath:
                found += sorted(Path(dirpath).glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        best = [p for p in found if p.name.startswith("best")]
        if not (best or found):
            raise KDConfigError(f"the teacher run wrote no checkpoint (config "
                                f"{self.spec.teacher_config}, teacher: in {self.spec.path}); give "
                                f"it a ModelCheckpoint callback.")
        return (best or found)[-1]

    # ---- planning ---------------------------------------------------------------------------
    def _epoch_size(self, run_config, budget: Budget, seed: int) -> tuple[int, int]:
        """(training examples, optimizer steps per epoch) of a run, from its data module."""
        from kd_lightning.data import DistillDataModule

        data = {**run_config.data.as_dict(), "train_subset": budget, "subset_seed": seed}
        key = json.dumps(data, sort_keys=True, default=str)
        if key not in self._sizes:
            dm = DistillDataModule(**data)  # raises KDConfigError for an impossible budget
            n = len(dm.train_indices)
            per_epoch = n // dm.batch_size if dm.drop_last else math.ceil(n / dm.batch_size)
            self._sizes[key] = (n, per_epoch)
        return self._sizes[key]

    def check_budgets(self) -> None:
        """Every budget can be drawn for every method (before anything is written)."""
        for m in self.spec.methods:
            for b in self.spec.budgets:
                for candidate in self.spec.candidates(m, b):
                    config = self.spec.run_config(m, {**self.spec.settings(m, b), **candidate})
                    try:
                        self._epoch_size(config, b, self.spec.seeds[0])
                    except KDConfigError as err:
                        raise KDConfigError(f"budget M={budget_label(b)} cannot be run for "
                                            f"method '{m.name}': {err}") from None

    def plan(self, method: MethodSpec, budget: Budget, seed: int, candidate: dict, kind: str,
             teacher_ckpt: Path) -> RunPlan:
        """The ``kd-lightning fit`` arguments of one run, and its length."""
        spec = self.spec
        settings = {**spec.settings(method, budget), **candidate}
        config = spec.run_config(method, settings)
        _, per_epoch = self._epoch_size(config, budget, seed)
        unit, n = spec.length(budget)
        epochs = n if unit == "epochs" else max(1, round(n / max(per_epoch, 1)))
        label = budget_label(budget)
        name = f"{_slug(method.name)}/M{label}/seed{seed}"
        if candidate:
            name += "/" + _slug(candidate_label(candidate).replace(", ", "_"))
        # the config's callbacks are dropped first, so callbacks the study's or the method's
        # arguments add (--trainer.callbacks+=...) reach the run
        args = ["fit", "--config", spec.resolve(method.config), "--trainer.callbacks", "[]",
                *spec.args, *method.args, *override_args(settings),
                "--seed_everything", str(seed),
                "--data.train_subset", "null" if budget is None else str(budget),
                "--data.subset_seed", str(seed),
                "--trainer.max_epochs", str(epochs), "--trainer.max_steps", "-1",
                "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
                "--trainer.enable_checkpointing", "false",
                "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false",
                "--trainer.logger.init_args.save_dir", str(self.output / "runs"),
                "--trainer.logger.init_args.name", name,
                "--test_after_fit", "false" if kind == CANDIDATE else "true"]
        if config.model.init_args.get("teacher") is not None:
            args += ["--model.init_args.teacher_checkpoint", str(teacher_ckpt)]
        for key, frac in spec.epoch_fractions(method).items():
            args += [f"--{key}", str(max(1, round(frac * epochs)))]
        args += self.trainer_args
        return RunPlan(method, budget, seed, candidate, kind, args, epochs, epochs * per_epoch,
                       self.output / "runs" / name, needs_subprocess(config),
                       Results.key(method.name, label, seed, kind, candidate_key(candidate)),
                       needs_teacher=config.model.init_args.get("teacher") is not None)

    def _todo(self) -> tuple[int, int]:
        """(all runs of the study, runs done): a grid adds candidate runs and chosen tests."""
        done, total, finished = self.results.done(), 0, 0
        for b in self.spec.budgets:
            for m in self.spec.methods:
                label = budget_label(b)
                kinds = [(RUN, "")] if not m.grid else [
                    (CANDIDATE, candidate_key(c)) for c in self.spec.candidates(m, b)]
                for s in self.spec.seeds:
                    for kind, cand in kinds:
                        total += 1
                        finished += Results.key(m.name, label, s, kind, cand) in done
                    if m.grid:
                        total += 1
                        finished += any(k[:4] == (m.name, label, s, CHOSEN) for k in done)
        return total, finished

    # ---- running ----------------------------------------------------------------------------
    def _execute(self, plan: RunPlan, args: list[str] | None = None, log: str = "run.log",
                 **kwargs) -> tuple[dict[str, float], float]:
        start = time.perf_counter()
        log_file = plan.run_dir / log
        if self.runs is not None:  # a Ray task, waited for
            result = self.runs.run(args or plan.args, log_file, plan.isolate, **kwargs)
            if "error" in result:
                raise self._failure(plan, result["error"], log_file)
            return result["metrics"], result["seconds"]
        try:
            metrics = run_kd_lightning(args or plan.args, log_file, plan.isolate, **kwargs)
        except RunFailed as err:
            raise self._failure(plan, err, log_file) from None
        return metrics, time.perf_counter() - start

    def _failure(self, plan: RunPlan, err, log_file: Path) -> RunFailed:
        hint = ""
        if "teacher" in str(err).lower():
            hint = (f" The study's teacher is trained from {self.spec.teacher_config} "
                    f"(teacher: in {self.spec.path}) and cached at {self._teacher_ckpt}.")
        return RunFailed(f"run {plan.describe()} failed: {err} (log: {log_file}).{hint} "
                         f"Finished runs are kept in {self.results.path}; rerun the same "
                         f"command to continue.")

    def _row(self, plan: RunPlan, metrics: dict, seconds: float, **values) -> dict:
        def pct(key: str) -> Any:
            return round(100 * metrics[key], 3) if key in metrics else ""

        run_hash = hashlib.sha256(json.dumps(plan.args[2:]).encode()).hexdigest()[:12]
        row = {"study_hash": self.study_hash, "method": plan.method.name, "M": plan.label,
               "seed": plan.seed, "test_acc": pct("test/acc"),
               "teacher_acc": pct("test/teacher_acc"), "epochs": plan.epochs,
               "steps": plan.steps, "wall_time_s": round(seconds, 2), "run_hash": run_hash,
               "run_dir": str(plan.run_dir), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
               "kind": plan.kind, "candidate": candidate_key(plan.candidate),
               "val_acc": pct("val/acc")}
        row.update(values)
        self.results.append(row)
        return row

    def _train(self, plan: RunPlan, display: _Display) -> None:
        display.starting(plan.describe())
        start = time.perf_counter()
        try:
            metrics, seconds = self._execute(plan)
        except RunFailed as err:
            if not self.keep_going:
                raise
            self._record_failure(plan, err, time.perf_counter() - start, display)
            return
        self._record(plan, metrics, seconds, display)

    def _record(self, plan: RunPlan, metrics: dict, seconds: float, display: _Display) -> None:
        row = self._row(plan, metrics, seconds)
        if plan.kind == CANDIDATE:
            display.finished(f"{plan.describe()}: val acc {row['val_acc']:.2f}% "
                             f"({seconds:.0f} s, {plan.epochs} epochs; a candidate)")
        else:
            display.finished(f"{plan.describe()}: test acc {row['test_acc']:.2f}% "
                             f"({seconds:.0f} s, {plan.epochs} epochs)")

    def _record_failure(self, plan: RunPlan, err: RunFailed, seconds: float,
                        display: _Display) -> None:
        error = " ".join(str(err).split())
        self._row(plan, {}, seconds, kind=FAILED, error=error[:2000])
        display.finished(f"{plan.describe()}: FAILED, recorded as failed (not a result); "
                         f"the study goes on. {error}")

    def _select(self, method: MethodSpec, budget: Budget, display: _Display) -> None:
        """Train the grid's candidates, choose one by validation accuracy, test only it."""
        spec, label = self.spec, budget_label(budget)
        candidates = spec.candidates(method, budget)
        for candidate in candidates:
            for seed in spec.seeds:
                plan = self.plan(method, budget, seed, candidate, CANDIDATE, self._teacher_ckpt)
                if plan.key in self.results.done():
                    continue
                display.starting(plan.describe())
                metrics, seconds = self._execute(plan, validate=True, save_weights=plan.weights)
                self._record(plan, metrics, seconds, display)
        keys = [candidate_key(c) for c in candidates]
        rows = self.results.rows()
        chosen, means = choose(rows, method.name, label, keys, spec.seeds)
        best = candidates[keys.index(chosen)]
        others = "; ".join(f"{candidate_label(c)}: {means[k]:.2f}%"
                           for c, k in zip(candidates, keys) if k != chosen)
        for seed in spec.seeds:
            plan = self.plan(method, budget, seed, best, CHOSEN, self._teacher_ckpt)
            if any(k[:4] == plan.key[:4] for k in self.results.done()):
                continue
            fit = self.plan(method, budget, seed, best, CANDIDATE, self._teacher_ckpt)
            if not fit.weights.is_file():  # removed since: the same run gives the same weights
                self._execute(fit, validate=True, save_weights=fit.weights)
            display.starting(f"{plan.describe()} (test)")
            test_args = ["test", *fit.args[1:], "--trainer.logger.init_args.version", "test",
                         "--ckpt_path", str(fit.weights)]
            metrics, seconds = self._execute(plan, test_args, "test.log")
            fit_row = next(r for r in rows if Results.key(
                r["method"], r["M"], r["seed"], r["kind"], r["candidate"]) == fit.key)
            row = self._row(plan, metrics, seconds + float(fit_row["wall_time_s"]),
                            val_acc=fit_row["val_acc"], run_hash=fit_row["run_hash"])
            display.finished(f"{method.name} M={label} seed={seed}: "
                             f"{candidate_label(best)} chosen (mean val acc {means[chosen]:.2f}%"
                             f"{'; ' + others if others else ''}), test acc "
                             f"{row['test_acc']:.2f}%")
        for candidate in candidates:  # the weights of the candidates not chosen
            if candidate is not best:
                for seed in spec.seeds:
                    self.plan(method, budget, seed, candidate, CANDIDATE,
                              self._teacher_ckpt).weights.unlink(missing_ok=True)

    def run(self) -> None:
        """Train (or skip, if done) every run of the study; writes results.csv and study.json."""
        self.check_budgets()
        self.prepare_output()
        with _Display(self.progress) as display:
            if self.runs is not None:
                self._run_parallel(display)
                return
            self._prepare_teacher(display)
            display.runs(*self._todo())
            done = self.results.done()
            for budget in self.spec.budgets:
                for method in self.spec.methods:
                    if method.grid:
                        self._select(method, budget, display)
                        continue
                    for seed in self.spec.seeds:
                        plan = self.plan(method, budget, seed, {}, RUN, self._teacher_ckpt)
                        if plan.key not in done:
                            self._train(plan, display)

    def _prepare_teacher(self, display: _Display) -> None:
        self._teacher_ckpt, self.teacher_acc = self.teacher_checkpoint(display)
        self._write_meta({"config": self.spec.teacher_config, "checkpoint":
                          str(self._teacher_ckpt), "test_acc": self.teacher_acc})

    def _plans(self, teacher_ckpt: Path | None) -> list[RunPlan]:
        """Every run not done yet (grid candidates included), in study order; with
        ``teacher_ckpt=None`` only the runs that need no teacher."""
        done, plans = self.results.done(), []
        for budget in self.spec.budgets:
            for method in self.spec.methods:
                kind = CANDIDATE if method.grid else RUN
                for candidate in self.spec.candidates(method, budget):
                    for seed in self.spec.seeds:
                        plan = self.plan(method, budget, seed, candidate, kind, teacher_ckpt)
                        if plan.key not in done and (teacher_ckpt or not plan.needs_teacher):
                            plans.append(plan)
        return plans

    def _run_parallel(self, display: _Display) -> None:
        """The runs as Ray tasks, longest first (:class:`LongestFirst`); the driver writes each
        row as its run finishes. The runs that need no teacher start at once and train while the
        driver trains (or loads) the teacher. Then, per grid, the chosen candidate's tests
        (:meth:`_select`, whose candidates are all done by then)."""
        display.print(self.runs.describe())
        queue = LongestFirst(self._plans(None))
        pending, stop = {}, None

        def fill() -> None:
            while queue and len(pending) < self.runs.window():
                plan = queue.pop()
                extra = dict(validate=True, save_weights=plan.weights) \
                    if plan.kind == CANDIDATE else {}
                pending[self.runs.submit(plan.args, plan.run_dir / "run.log", plan.isolate,
                                         **extra)] = plan

        try:
            fill()
            self._prepare_teacher(display)
            queued = {p.key for p in queue.plans} | {p.key for p in pending.values()}
            queue.extend(p for p in self._plans(self._teacher_ckpt) if p.key not in queued)
            total, finished = self._todo()
            display.runs(total, finished)
            display.starting(f"{total - finished} runs on Ray")
            fill()
            while pending:
                ref, result = self.runs.next(pending)
                plan = pending.pop(ref)
                if "error" not in result:
                    queue.observe(plan, result["seconds"])
                    self._record(plan, result["metrics"], result["seconds"], display)
                    fill()
                    continue
                err = self._failure(plan, result["error"], plan.run_dir / "run.log")
                if plan.kind == CANDIDATE or not self.keep_going:
                    # a grid's choice needs every candidate; --stop-on-failure stops the study
                    stop = stop or err
                    if not self.keep_going:
                        break
                    fill()
                    continue
                self._record_failure(plan, err, result.get("seconds", 0.0), display)
                fill()
        finally:
            if pending:  # stopped, interrupted, or the teacher failed: the runs going are abandoned
                self.runs.cancel(pending)
        if stop is not None:
            raise stop
        for budget in self.spec.budgets:
            for method in self.spec.methods:
                if method.grid:
                    self._select(method, budget, display)
