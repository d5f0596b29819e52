"""``kd-lightning fit|validate|test|predict``: the LightningCLI of kd_lightning.

Examples::

    kd-lightning fit --config configs/mnist1d/teacher.yaml
    kd-lightning fit --config configs/mnist1d/response.yaml --trainer.precision bf16-mixed
    kd-lightning fit --config configs/mnist1d/response.yaml \\
        --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp
    kd-lightning test --config configs/mnist1d/response.yaml --ckpt_path runs/.../last.ckpt
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import DistillationModule
from kd_lightning.training import PublishBest
from kd_lightning.training.figures import InspectionFigures, tensorboard_logger
from kd_lightning.models.teacher import record_test_metrics
from kd_lightning.training.progress import EpochSummary, console_progress_bar

#: a class_path that could not be imported, as jsonargparse reports it
_IMPORT_PROBLEM = re.compile(
    r"Problem with given class_path '([^']+)':\s*\n\s*((?:No module named|module '[^']*' has no "
    r"attribute|cannot import name|Unable to import|[A-Za-z]*Error\b)[^\n]*)")


class KDArgumentParser(LightningArgumentParser):
    """Lightning's parser, reporting a ``class_path`` that cannot be imported in one line (instead
    of the usage text and every alternative jsonargparse tried)."""

    def error(self, message: str, ex: Exception | None = None):
        match = _IMPORT_PROBLEM.search(message or "")
        if match is None or not self.exit_on_error:
            return super().error(message, ex)
        class_path, problem = match.group(1), match.group(2).strip()
        print(f"kd-lightning: error: cannot import class_path '{class_path}': {problem}. A class in "
              f"a .py file is found when kd-lightning runs in that file's folder (the working "
              f"directory is importable) or when the folder is on PYTHONPATH; check the module and "
              f"class names.", file=sys.stderr)
        raise SystemExit(2)


class KDLightningCLI(LightningCLI):
    """LightningCLI with the data -> model links and the defaults of this package."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="after `fit`, test the best checkpoint (by val/acc) on the test split")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes",
                              apply_on="instantiate")
        # figures and final-metric hparams in TensorBoard (attached only with a TensorBoardLogger)
        parser.add_class_arguments(InspectionFigures, "inspection")
        parser.set_defaults({
            "trainer.logger": {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "default"},
            },
            "trainer.callbacks": [
                # best.ckpt by validation accuracy (tested after fit) ...
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"monitor": "val/acc", "mode": "max", "filename": "best",
                               "enable_version_counter": False}},
                # ... and last.ckpt, the latest weights, rewritten every epoch (for resuming).
                # (ModelCheckpoint(save_last=True) only rewrites last.ckpt when a new best is saved.)
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"filename": "last", "save_top_k": 1, "monitor": None,
                               "enable_version_counter": False}},
                {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor",
                 "init_args": {"logging_interval": "epoch"}},
            ],
        })

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, {})
        if self.subcommand == "fit":
            check_log_folder(config)
            continue_run_folder(config)

    def instantiate_trainer(self, **kwargs):
        """The configured trainer, with a progress bar that suits where stdout goes
        (:func:`~kd_lightning.training.progress.console_progress_bar`) unless the configuration
        turns the bar off or names one."""
        trainer = self.config_init.get(self.subcommand, self.config_init).get("trainer") or {}
        callbacks = list(kwargs.get("callbacks", trainer.get("callbacks")) or [])
        if trainer.get("enable_progress_bar") is not False and \
                not any(isinstance(cb, ProgressBar) for cb in callbacks):
            kwargs["callbacks"] = [*callbacks, console_progress_bar()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        if not has_validation_data(self.datamodule):
            quiet_without_validation(self.trainer)
        if self.trainer.progress_bar_callback is None and not any(
                isinstance(cb, EpochSummary) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(EpochSummary())
        self.attach_inspection()
        frozen_teacher = getattr(self.model, "frozen_teacher", None)
        if frozen_teacher is not None:
            print_rank_zero(frozen_teacher.describe())

    def before_validate(self) -> None:
        self.attach_inspection()

    def before_test(self) -> None:
        self.attach_inspection()

    def attach_inspection(self) -> None:
        """Add the configured :class:`InspectionFigures` when the run logs to TensorBoard (and the
        trainer has none yet); other loggers get no figures."""
        inspection = self.config_init.get(self.subcommand, {}).get("inspection")
        if isinstance(inspection, InspectionFigures) and tensorboard_logger(self.trainer) is not None \
                and not any(isinstance(cb, InspectionFigures) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(inspection)

    def after_fit(self) -> None:
        if self.config.get(self.subcommand, {}).get("test_after_fit", False) and not self.trainer.interrupted:
            # the best checkpoint of the first ModelCheckpoint (by val/acc in the shipped configs),
            # named by its path: ckpt_path="best" would pick the same one but warns whenever a
            # run has several checkpoint callbacks (best.ckpt and last.ckpt)
            callback = self.trainer.checkpoint_callback
            ckpt = callback.best_model_path if callback is not None and callback.best_model_path else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)
            if ckpt and self.trainer.is_global_zero:
                record_tested_checkpoint(self.trainer, ckpt)
        else:  # no test: the hparams tab gets the last validation metrics
            for callback in self.trainer.callbacks:
                if isinstance(callback, InspectionFigures):
                    callback.write_hparams(self.trainer, self.model)


def record_tested_checkpoint(trainer, ckpt: str) -> None:
    """Record the test metrics in the checkpoint just tested, and in its published copy
    (:class:`~kd_lightning.training.PublishBest`) when this run made one, so that a student
    distilling from it can say how good its teacher is."""
    if not record_test_metrics(ckpt, trainer.callback_metrics):
        return
    for callback in trainer.callbacks:
        published = getattr(callback, "published", None)
        if isinstance(callback, PublishBest) and published is not None and Path(published).is_file():
            record_test_metrics(published, trainer.callback_metrics)


@rank_zero_only
def print_rank_zero(line: str) -> None:
    print(line, flush=True)


def check_checkpoint_path(ckpt: str | None) -> None:
    """A ``--ckpt_path`` that is missing, truncated or not a checkpoint stops the run before
    anything is written (not with a traceback from deep inside Lightning)."""
    if not ckpt or ckpt in ("last", "best", "hpc") or str(ckpt).startswith("registry"):
        return
    path = Path(ckpt)
    if not path.is_file():
        raise KDConfigError(f"--ckpt_path {ckpt} does not exist; give a checkpoint file, e.g. "
                            f"runs/<name>/version_N/checkpoints/last.ckpt.")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise KDConfigError(f"--ckpt_path {ckpt} is not a readable checkpoint ({err}); it may be "
                            f"truncated (a copy or a save that was cut short) or not a file "
                            f"written by Lightning.") from None
    if broken is not None:
        raise KDConfigError(f"--ckpt_path {ckpt} is damaged (its entry {broken} fails its "
                            f"checksum); use an earlier checkpoint of the run.")


def check_log_folder(config) -> None:
    """The logger's folder must be writable before training starts, not after the first epoch."""
    logger = config.get("trainer", {}).get("logger")
    save_dir = getattr(getattr(logger, "init_args", None), "save_dir", None)
    if not save_dir:
        return
    folder = Path(save_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError as err:
        raise KDConfigError(f"the log folder {save_dir} cannot be created ({err.strerror}); set "
                            f"--trainer.logger.init_args.save_dir to a folder you can write.") from None
    if not writable:
        raise KDConfigError(f"the log folder {save_dir} is not writable; set "
                            f"--trainer.logger.init_args.save_dir to a folder you can write.")


def continue_run_folder(config) -> None:
    """Resume a run in its own version folder: ``fit --ckpt_path runs/<name>/version_3/checkpoints/
    last.ckpt`` logs to ``version_3`` again instead of opening ``version_4``, so the run keeps one
    TensorBoard history and its checkpoint callbacks, whose folder is the same, restore their best
    score and path (``fit`` then tests the run's best checkpoint, not the best since the resume).
    Only when the checkpoint sits in the folder the configured logger would use for that version
    and no version is set; otherwise the logger's own choice stands."""
    ckpt = config.get("ckpt_path")
    logger = config.get("trainer", {}).get("logger")
    if not ckpt or ckpt in ("last", "best", "hpc", "registry") or not hasattr(logger, "init_args"):
        return
    args = logger.init_args
    if "version" not in args or args.get("version") is not None or "save_dir" not in args:
        return
    run_dir = Path(ckpt).resolve().parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    expected = (Path(args.save_dir) / (args.get("name") or "")).resolve()
    if run_dir.parent == expected and run_dir.name.startswith("version_"):
        args.version = run_dir.name
def has_validation_data(datamodule) -> bool:
    """False when the data module holds out no validation examples (``data.val_split: 0``)."""
    if datamodule is None or getattr(datamodule, "val_split", None) is None:
        return True
    return datamodule.val_split != 0


def quiet_without_validation(trainer) -> None:
    """Train without validation: no validation loop (and no empty-loader warnings), and every
    checkpoint that would follow a validation metric keeps the latest weights instead, so
    ``best.ckpt`` (tested after fit) holds the final weights."""
    trainer.limit_val_batches = 0
    trainer.num_sanity_val_steps = 0
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and _is_validation_metric(callback.monitor):
            callback.monitor = None
            if callback.save_top_k not in (-1, 0, 1):
                callback.save_top_k = 1


def _is_validation_metric(name: str | None) -> bool:
    return name is not None and (name.startswith(("val/", "val_")) or name == "hp_metric")


#: warnings of other packages that say nothing about the run, ignored while ``kd-lightning`` runs:
#: (message, category, module that issues it)
IGNORED_WARNINGS = [
    # torch deprecated an isinstance check that Lightning's own pytree helper still makes; a
    # Lightning release fixes it, nothing in a run can
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     r"pytorch_lightning\.utilities\._pytree"),
    # Lightning compares its batches per epoch with log_every_n_steps; kd_lightning's loss-term
    # windows (training.term_log) span epochs and count optimizer steps, so each window is logged
    # whatever the epoch length
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning,
     r"pytorch_lightning\.loops\.fit_loop"),
]
#: ignored while ``kd-lightning test|validate|predict`` runs: such a run logs to a new version
#: folder and writes no checkpoint, so Lightning's notice that the checkpoint callbacks' records of
#: the run (kept for resuming its training) are not restored says nothing about it
IGNORED_EVALUATION_WARNINGS = [
    (r"The dirpath has changed from", UserWarning, r"pytorch_lightning\.callbacks\.model_checkpoint"),
]
#: log records of other packages that say nothing about the run: (logger, start of the message)
IGNORED_LOG_RECORDS = [
    # an advertisement for a cloud logging product, printed by every Trainer
    ("pytorch_lightning.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
]


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def third_party_notices_filtered(evaluation: bool = False):
    """:data:`IGNORED_WARNINGS` (and, for an ``evaluation`` subcommand,
    :data:`IGNORED_EVALUATION_WARNINGS`) and :data:`IGNORED_LOG_RECORDS` ignored for the duration
    (the process-wide warning filters and loggers are restored after it)."""
    with warnings.catch_warnings():
        for message, category, module in IGNORED_WARNINGS + (IGNORED_EVALUATION_WARNINGS if evaluation else []):
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        filters = [(logging.getLogger(name), _DropRecords(prefix)) for name, prefix in IGNORED_LOG_RECORDS]
        for logger, dropped in filters:
            logger.addFilter(dropped)
        try:
            yield
        finally:
            for logger, dropped in filters:
                logger.removeFilter(dropped)


def cli_main(args: list[str] | None = None, run: bool = True,
             cli_class: type[KDLightningCLI] | None = None) -> KDLightningCLI | None:
    """Entry point of ``kd-lightning``; ``args`` lets tests and notebooks drive it in-process
    (``cli_class``: a subclass of :class:`KDLightningCLI` to run instead).

    The working directory is importable, so that ``class_path: my_model.MyNet`` finds a
    researcher's ``my_model.py`` beside the config without setting ``PYTHONPATH``.
    """
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.insert(0, cwd)
    try:
        # LightningCLI reads a checkpoint's hyperparameters while parsing: check it first
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        for i, arg in enumerate(argv):
            if arg.startswith("--ckpt_path="):
                check_checkpoint_path(arg.split("=", 1)[1])
            elif arg == "--ckpt_path" and i + 1 < len(argv):
                check_checkpoint_path(argv[i + 1])
        subcommand = next((a for a in argv if a in ("fit", "validate", "test", "predict")), None)
        with third_party_notices_filtered(evaluation=subcommand in ("validate", "test", "predict")):
            return (cli_class or KDLightningCLI)(
                DistillationModule, DistillDataModule, subclass_mode_model=True,
                save_config_kwargs={"overwrite": True}, parser_class=KDArgumentParser, args=args,
                run=run,
            )
    except SIGTERMException:
        from kd_lightning.training import preemption

        where = (f"; a resumable checkpoint is at {preemption.interrupted_checkpoint} (resume with "
                 f"the same command plus --ckpt_path {preemption.interrupted_checkpoint})"
                 if preemption.interrupted_checkpoint else "")
        print(f"kd-lightning: interrupted by SIGTERM{where}.", file=sys.stderr)
        raise SystemExit(143) from None
    except Exception as err:  # noqa: BLE001 - only configuration errors are reported briefly
        config_error = find_config_error(err)
        if config_error is None:
            raise
        print(f"kd-lightning: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None


def find_config_error(err: BaseException | None) -> KDConfigError | None:
    """The :class:`KDConfigError` behind ``err`` (jsonargparse and Lightning wrap exceptions)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KDConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main() -> None:
    """Console script ``kd-lightning``."""
    cli_main()


if __name__ == "__main__":  # pragma: no cover
    main()
