"""The run layer: one ``kd-lightning`` job, in this process or in a subprocess, and its outcome.

:func:`run_job` runs ``kd-lightning ARGS`` (``fit``/``validate``/``test`` with any CLI
arguments) through :func:`kd_lightning.cli.cli_main`, exactly as the command line would, with
its output in a log file, and returns a :class:`JobResult` (final metrics, seconds, the run
folder, the checkpoints written, the log). A job that fails raises :class:`JobFailed` (exit
status, the run's own error line, the log); one stopped by Ctrl-C or SIGTERM raises
:class:`JobInterrupted`. The study, ``kd-lightning-born-again`` and
``benchmarks/cifar100_table.py`` run every training through it; :func:`parse_run` checks a
job's configuration before it runs and :func:`claim_output` their output folder (resume, ``--overwrite``).

Multi-process strategies (DDP) start their other processes by re-running the command that
started the first one, so such jobs (``Job.isolate``; :func:`needs_subprocess` tells from a
parsed configuration) run in a subprocess of their own::

    python -m kd_lightning.jobs --result R.json [--progress P.jsonl] [--validate] \\
        [--save-weights W.ckpt] -- fit --config ... (the kd-lightning arguments)

Every process of the job runs the same code; rank 0 writes the result file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from pytorch_lightning.callbacks import Callback, Checkpoint

from kd_lightning import KDConfigError

#: Lightning's loggers, whose console handlers hold the ``sys.stderr`` of import time
LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric",
           "torchmetrics")


@dataclass
class Job:
    """``kd-lightning ARGS``, its output to ``log``; ``isolate``: in a subprocess.

    ``validate``: afterwards measure the final weights on the validation split too (``val/acc``
    beside the test's metrics);
    ``save_weights``: write the final weights there (a checkpoint without optimizer state);
    ``resume``: a ``fit`` job's resume folder (:class:`ResumePoint`, written at an epoch's end
    once ``resume_every`` seconds have passed since the last): a job killed part-way continues
    from there when it is run again.
    """

    args: list[str]
    log: Path
    isolate: bool = False
    validate: bool = False
    save_weights: Path | None = None
    resume: Path | None = None
    resume_every: float = 60.0


@dataclass
class JobResult:
    metrics: dict[str, float]
    seconds: float = 0.0
    log: str = ""
    #: the logger's folder of the run (TensorBoard files, hparams.yaml); "" without a logger
    run_dir: str = ""
    #: the checkpoints the run's ModelCheckpoint callbacks wrote (best first, as configured)
    checkpoints: list[str] = field(default_factory=list)
    #: where it ran (:func:`kd_lightning.environment.describe`: versions, CPU kernels, threads, device)
    environment: dict = field(default_factory=dict)
    #: the epochs an earlier, killed attempt had finished (0: trained from the start)
    resumed_epochs: int = 0


class JobFailed(Exception):
    """A job failed: its exit status (``None`` for an exception), what it said, its log."""

    def __init__(self, message: str, exit_code: int | None = None, log: Path | None = None):
        super().__init__(message)
        self.exit_code, self.log = exit_code, log


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a job; ``exit_code`` 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


#: exit statuses of a job stopped by SIGINT / SIGTERM (the CLI's 130 / 143, or the signal itself)
INTERRUPTED = {130: 130, -signal.SIGINT: 130, 143: 143, -signal.SIGTERM: 143}


def quiet_lightning() -> None:
    """Lightning's INFO lines (GPU available, ...) off: jobs say what matters in their logs."""
    for name in LOGGERS[:2]:
        logging.getLogger(name).setLevel(logging.ERROR)


def needs_subprocess(config) -> bool:
    """Whether a parsed ``kd-lightning`` configuration starts several processes."""
    trainer = config.trainer
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


@functools.lru_cache(maxsize=1)
def run_parser():
    """The argument parser of ``kd-lightning fit`` (built once; nothing is instantiated)."""
    from kd_lightning.cli import KDArgumentParser, KDLightningCLI
    from kd_lightning.data import DistillDataModule
    from kd_lightning.methods import DistillationModule

    class ParserOnly(KDLightningCLI):
        def parse_arguments(self, parser, args) -> None:
            self.config = {"seed_everything": False}  # parse nothing, seed nothing

        def instantiate_classes(self) -> None:
            pass

    # the same classes and modes as kd_lightning.cli.cli_main; errors raise instead of exiting
    return ParserOnly(DistillationModule, DistillDataModule, subclass_mode_model=True, run=False,
                      parser_class=KDArgumentParser, parser_kwargs={"exit_on_error": False}).parser


def build(args: list[str]):
    """``kd-lightning ARGS`` built (model, data module, trainer) but not run, its output discarded."""
    from kd_lightning.cli import cli_main

    with output_to(io.StringIO()):
        return cli_main(args=[str(a) for a in args], run=False)


def parse_error_text(err: BaseException) -> str:
    """jsonargparse's multi-line message, reduced to the lines that say what is wrong."""
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
             "Given value type:", "Given value:", "Expected a <class 'NoneType'>")
    lines = [line.strip().removeprefix("- ") for line in str(err).splitlines()]
    return re.sub(r"\s+", " ", " ".join(x for x in lines if x and not x.startswith(noise))).strip()


def parse_run(config: str, args: list[str], where: str):
    """``kd-lightning fit --config CONFIG ARGS`` parsed (a jsonargparse Namespace), checked
    before a job runs; a :class:`KDConfigError` saying ``where`` if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run_parser().parse_args(["--config", config, *args])
    except Exception as err:  # noqa: BLE001 - jsonargparse raises ArgumentError / TypeError
        raise KDConfigError(f"{where}: `kd-lightning fit --config {config}` with the arguments "
                            f"{args} does not parse: {parse_error_text(err)}") from None


def delete_own_files(folder: Path, paths: list[Path]) -> None:
    """``--overwrite``: delete ``paths`` (what a tool wrote into ``folder``), never ``folder``
    itself, and nothing when it is the working folder, one of its parents, home or a root."""
    where, cwd = Path(folder).resolve(), Path.cwd().resolve()
    if where in {cwd, Path.home().resolve(), Path(where.anchor)} or where in cwd.parents:
        raise KDConfigError(
            f"--overwrite refuses to delete results in {folder} (the working folder, one of its "
            f"parents, home or a root); give the run its own folder with --output.")
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def claim_output(folder: Path, meta: str, identity: str, own: tuple[str, ...], overwrite: bool,
                 what: str, other: str) -> None:
    """Make ``folder`` the output of a ``what`` (a study, ...) whose configuration hashes to
    ``identity`` (kept in its ``meta`` file): new or empty, or holding this configuration's output
    (resumed). One holding ``other`` (another configuration's output) is refused, or with
    ``overwrite`` loses exactly the files the tool writes (``own``: names or glob patterns). A
    non-empty folder without ``meta`` is never written to."""
    folder, path = Path(folder), Path(folder) / meta
    if folder.exists() and not folder.is_dir():
        raise KDConfigError(f"output {folder} is a file, not a folder; give --output a folder for "
                            f"the {what}'s results.")
    if folder.exists() and any(folder.iterdir()):
        old = json.loads(path.read_text()).get("hash") if path.is_file() else None
        if old is None:
            raise KDConfigError(
                f"output folder {folder} is not empty and holds no {what} results (no {meta}); a "
                f"{what} never writes into or deletes such a folder. Give --output a new or empty "
                f"folder.")
        if old != identity and not overwrite:
            raise KDConfigError(
                f"output folder {folder} holds {other} (hash {old}); this {what}'s hash is "
                f"{identity}. Pass --overwrite to replace those results (only the files a {what} "
                f"writes are deleted), --output DIR to write elsewhere, or rerun the original "
                f"configuration to resume it.")
        if old != identity:
            delete_own_files(folder, [p for pattern in own for p in folder.glob(pattern)])
    folder.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------
# progress of a job's epochs

#: where :class:`EpochProgress` reports (set for the duration of a job)
_listener: Callable[[dict], None] | None = None


class EpochProgress(Callback):
    """Reports each finished training epoch (epoch, max_epochs, val_acc) to ``run_job``'s
    ``on_epoch`` (add it with ``--trainer.callbacks+=kd_lightning.jobs.EpochProgress``)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if _listener is None or not trainer.is_global_zero:
            return
        val = trainer.callback_metrics.get("val/acc")
        _listener({"epoch": trainer.current_epoch + 1, "max_epochs": trainer.max_epochs,
                   "val_acc": None if val is None else float(val)})


class ResumePoint(Checkpoint):
    """``resume.ckpt`` in ``dirpath`` at the end of a training epoch once ``every`` seconds have
    passed since the fit started or the last one was written (0: every epoch; a few-data run's
    epochs can be single steps), so that a job killed part-way (a machine lost, a session ended,
    SIGKILL) loses at most that long and an epoch.

    A checkpoint at an epoch's end resumes the run bit for bit (the random states are in it:
    :mod:`kd_lightning.training.random_states`), so a resumed job ends with the weights and
    metrics of an uninterrupted one. The checkpoint carries ``key`` (the job's arguments: a
    checkpoint of other arguments is never resumed), the logger's version (the resumed run logs
    into the same folder) and the seconds trained so far. It is a :class:`Checkpoint`, so Lightning
    calls it after every other callback and the module's own epoch-end hooks; it is not a
    ``ModelCheckpoint``, so ``fit``'s test after training uses the final weights in memory as
    before. :func:`run_job` adds it to jobs with a ``resume`` folder and removes the folder once
    the job has succeeded."""

    FILE = "resume.ckpt"

    def __init__(self, dirpath: str, key: str, every: float = 60.0) -> None:
        self.dirpath, self.key, self.every = dirpath, key, every
        #: Lightning's checkpoint-callback attributes (none of them tested or published)
        self.best_model_path = self.last_model_path = ""
        self._seconds_before = 0.0
        self._start = self._saved = time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = self._saved = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # every process of a multi-process run saves together (the save has a barrier): rank 0's
        # clock decides
        if trainer.strategy.broadcast(time.perf_counter() - self._saved >= self.every):
            # the full state (optimizer, loops, callbacks) to resume from
            trainer.save_checkpoint(str(Path(self.dirpath) / self.FILE), weights_only=False)
            self._saved = time.perf_counter()

    def state_dict(self) -> dict:
        # the trainer (and its logger) this callback is attached to, at the time it saves
        trainer = getattr(self, "_trainer", None)
        version = getattr(getattr(trainer, "logger", None), "version", None)
        return {"key": self.key, "logger_version": version,
                "seconds": self._seconds_before + time.perf_counter() - self._start}

    def load_state_dict(self, state: dict) -> None:
        self._seconds_before = float(state.get("seconds", 0.0))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer


def job_key(job: Job) -> str:
    """What a resume checkpoint must have been written with: the job's arguments."""
    return hashlib.sha256(json.dumps([str(a) for a in job.args]).encode()).hexdigest()[:16]


@dataclass
class _Resume:
    args: list[str]
    epochs: int = 0
    seconds: float = 0.0
    #: the line the job's log gets before this attempt ("" when the folder holds no checkpoint)
    note: str = ""


def _resume_args(job: Job) -> _Resume:
    """The arguments that keep ``job``'s :class:`ResumePoint` and, when its folder holds a
    checkpoint of the same arguments, continue from it (in the same logger version)."""
    folder, key = Path(job.resume), job_key(job)
    point = {"class_path": f"{__name__}.ResumePoint",
             "init_args": {"dirpath": str(folder), "key": key, "every": job.resume_every}}
    args = [*map(str, job.args), "--trainer.enable_checkpointing", "true",
            f"--trainer.callbacks+={json.dumps(point)}"]
    ckpt = folder / ResumePoint.FILE
    if not ckpt.is_file():
        return _Resume(args)
    import torch

    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        state = next(v for k, v in saved.get("callbacks", {}).items() if k.startswith(ResumePoint.__qualname__))
    except Exception as err:  # noqa: BLE001 - unreadable or not one of ours: train from the start
        refused = f"it cannot be read as a {ResumePoint.__qualname__} checkpoint ({type(err).__name__}: {err})"
    else:
        refused = "" if state.get("key") == key else "it was written by a job with other arguments"
    if refused:
        return _Resume(args, note=f"not resumed from {ckpt}: {refused}; trained from the start")
    version = state.get("logger_version")
    args += ["--ckpt_path", str(ckpt), *(["--trainer.logger.init_args.version", str(version)]
                                         if version is not None else [])]
    epochs, seconds = int(saved.get("epoch", 0)) + 1, float(state.get("seconds", 0.0))
    return _Resume(args, epochs, seconds, f"resumed after epoch {epochs} from {ckpt} ({seconds:.0f} s trained before)")


# ------------------------------------------------------------------------------------------
# running


def run_job(job: Job, on_epoch: Callable[[dict], None] | None = None) -> JobResult:
    """Run ``job``; raises :class:`JobFailed` or :class:`JobInterrupted`. A job with a
    ``resume`` folder continues an earlier attempt's :class:`ResumePoint` (its seconds count
    those of the earlier attempt up to that checkpoint; its log goes on after the earlier
    attempt's) and removes the folder when it succeeds."""
    job.log = Path(job.log)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    resume = _resume_args(job) if job.resume is not None else None
    run = job if resume is None else replace(job, args=resume.args)
    mode = "a" if resume is not None and resume.note and job.log.is_file() else "w"
    if mode == "a":  # the earlier attempt's log, then this one's
        with open(job.log, "a") as log:
            log.write(f"\n--- {resume.note} ---\n")
    start = time.perf_counter()
    result = (_subprocess if job.isolate else _in_process)(run, on_epoch, mode)
    result.seconds, result.log = time.perf_counter() - start, str(job.log)
    if resume is not None:
        result.seconds += resume.seconds
        result.resumed_epochs = resume.epochs
        shutil.rmtree(job.resume, ignore_errors=True)
    return result


@functools.lru_cache(maxsize=1)
def job_cli():
    """The CLI class of in-process jobs: ``kd-lightning``'s, with its parser built once per
    process (:class:`~kd_lightning.training.lightning_compat.ReusedParser`)."""
    from kd_lightning.cli import KDLightningCLI
    from kd_lightning.training.lightning_compat import ReusedParser

    return type("JobCLI", (ReusedParser, KDLightningCLI), {})


def _cli(job: Job) -> tuple[Any, JobResult]:
    """The job through the CLI in this process: (trainer, result without timing)."""
    from kd_lightning.cli import cli_main
    from kd_lightning.environment import describe

    trainer = cli_main(args=[str(a) for a in job.args], cli_class=job_cli()).trainer
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # the test's, after fit
    if job.validate:
        trainer.limit_val_batches = 1.0  # a study's run trains with limit_val_batches 0
        trainer.validate(trainer.lightning_module, datamodule=trainer.datamodule, verbose=False)
        metrics.update((k, float(v)) for k, v in trainer.callback_metrics.items())
    if job.save_weights:
        trainer.save_checkpoint(str(job.save_weights), weights_only=True)
    ckpts = [p for cb in trainer.checkpoint_callbacks
             for p in (cb.best_model_path, cb.last_model_path) if p]
    return trainer, JobResult(metrics, run_dir=str(trainer.log_dir or ""), checkpoints=list(dict.fromkeys(ckpts)),
                              environment=describe(trainer))


@contextlib.contextmanager
def output_to(stream):
    """stdout, stderr and Lightning's console log handlers into ``stream``; warnings off."""
    handlers = [h for name in LOGGERS for h in logging.getLogger(name).handlers
                if type(h) is logging.StreamHandler]
    old = [h.stream for h in handlers]
    for h in handlers:
        h.setStream(stream)
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for h, s in zip(handlers, old):
            h.setStream(s)


def _set_sigint(handler):
    """Install a SIGINT handler; the previous one (``None`` off the main thread, e.g. in a Ray
    worker's task thread, where signals cannot be handled)."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None


def _in_process(job: Job, on_epoch, mode: str = "w") -> JobResult:
    global _listener
    # Lightning answers Ctrl-C during fit with a graceful stop and exit status 1, which alone is
    # not told apart from a failure: a handler of ours notes the signal first
    sigints: list[int] = []

    def on_sigint(signum, frame):
        sigints.append(signum)
        raise KeyboardInterrupt

    # (a process that ignores SIGINT, e.g. started in the background, keeps ignoring it)
    previous = None if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else _set_sigint(on_sigint)
    _listener = on_epoch
    try:
        # line-buffered: every line is in the file as soon as it is written, so a job whose
        # process is killed (a Ray worker, the OOM killer) leaves its log up to that point
        with open(job.log, mode, buffering=1) as log, output_to(log):
            print("kd-lightning " + shlex.join(map(str, job.args)), flush=True)
            try:
                return _cli(job)[1]
            except SystemExit as exc:  # a configuration error (printed into the log) or a signal
                code = exc.code
            except KeyboardInterrupt:
                code = 130
            except Exception as exc:  # noqa: BLE001 - any failure of the training itself
                traceback.print_exc()
                raise JobFailed(f"{type(exc).__name__}: {exc}", None, job.log) from None
    finally:
        _listener = None
        if previous is not None:
            _set_sigint(previous)
    if sigints or code in INTERRUPTED:
        raise JobInterrupted(130 if sigints else INTERRUPTED[code])
    raise JobFailed(f"exit status {code}: {error_lines(job.log)}", code, job.log)


def error_lines(log: Path) -> str:
    """What a failed job said: its one-line configuration error, or its last lines."""
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kd-lightning: error:")]
    if errors:
        return errors[-1][len("kd-lightning: error:"):].strip()
    return " / ".join(lines[-3:])


def _subprocess(job: Job, on_epoch, mode: str = "w") -> JobResult:
    result_file = job.log.with_suffix(".result.json")
    progress = job.log.with_suffix(".progress.jsonl")
    for stale in (result_file, progress):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "kd_lightning.jobs", "--result", str(result_file)]
    cmd += ["--progress", str(progress)] if on_epoch is not None else []
    cmd += ["--validate"] if job.validate else []
    cmd += ["--save-weights", str(job.save_weights)] if job.save_weights else []
    cmd += ["--", *map(str, job.args)]
    # the subprocess imports this same kd_lightning, wherever it was imported from
    here = str(Path(__file__).resolve().parents[1])
    # (unbuffered: the subprocess's output reaches the log as it is written, also when it is killed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    seen = 0
    with open(job.log, mode) as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = None
            while code is None:
                try:
                    code = proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
                if on_epoch is not None and progress.is_file():
                    lines = progress.read_text().splitlines()
                    for line in lines[seen:]:
                        on_epoch(json.loads(line))
                    seen = len(lines)
        except BaseException:
            proc.kill()
            raise
    if code in INTERRUPTED:
        raise JobInterrupted(INTERRUPTED[code])
    if code != 0 or not result_file.is_file():
        raise JobFailed(f"exit status {code}: {error_lines(job.log)}", code, job.log)
    return JobResult(**json.loads(result_file.read_text()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_lightning.jobs",
                                     description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--result", required=True, help="JSON file for the job's result")
    parser.add_argument("--progress", help="JSON-lines file for per-epoch progress")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--save-weights")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the kd-lightning arguments")
    opts = parser.parse_args(argv)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args

    def report(event: dict) -> None:
        with open(opts.progress, "a") as f:
            f.write(json.dumps(event) + "\n")

    global _listener
    _listener = report if opts.progress else None
    trainer, result = _cli(Job(args, Path(opts.result), validate=opts.validate,
                               save_weights=opts.save_weights))
    if trainer.global_rank == 0:
        Path(opts.result).write_text(json.dumps(asdict(result)))


if __name__ == "__main__":  # pragma: no cover
    # run main() of the module proper: the callback, imported by its class path, reports to
    # kd_lightning.jobs._listener, not to this __main__ copy's
    from kd_lightning.jobs import main as module_main

    module_main()
