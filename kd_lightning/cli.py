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
import importlib
import logging
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path

from lightning_fabric.plugins import CheckpointIO, TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from kd_lightning import KDConfigError
from kd_lightning.data import DistillDataModule
from kd_lightning.environment import RecordEnvironment
from kd_lightning.methods import DistillationModule
from kd_lightning.methods.checks import check_data
from kd_lightning.models.weights import raw_pickle, read_checkpoint
from kd_lightning.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
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

    def __init__(self, *args, **kwargs) -> None:  # --trainer.max_epoch is an error, not max_epochs
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

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

    #: (path, method) of a ``--ckpt_path`` written by another method than the configured one
    checkpoint_method: tuple[str, str] | None = None

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

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self.checkpoint_method = hold_back_foreign_checkpoint(self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, {})
        if self.checkpoint_method is not None:  # the configured method is built; ckpt_path stays
            config["ckpt_path"] = self.checkpoint_method[0]
        if self.subcommand == "fit":
            check_log_folder(config)
            continue_run_folder(config)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if getattr(self, "trainer", None) is not None:
            config = self.config_init.get(self.subcommand, {}) if self.subcommand else self.config_init
            install_atomic_checkpoints(self.trainer, config.get("trainer", {}).get("plugins"))

    def check_before_writing(self) -> None:
        """What needs the built model and data -- ``--ckpt_path`` against the model's networks,
        the networks against the data (class counts, input shape) -- checked before the trainer
        creates the run folder (``version_N/``, config, events, ``train_subset.json``)."""
        config = self.config.get(self.subcommand, {})
        ckpt = config.get("ckpt_path")
        if ckpt and Path(ckpt).is_file():
            written_by = self.checkpoint_method[1] if self.checkpoint_method is not None else None
            check_checkpoint_fits(self.model, ckpt, written_by)
        if isinstance(self.model, DistillationModule) and self.datamodule is not None:
            check_data(self.model, self.datamodule)

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
        self.check_before_writing()
        if not has_validation_data(self.datamodule):
            quiet_without_validation(self.trainer)
        if self.trainer.progress_bar_callback is None and not any(
                isinstance(cb, EpochSummary) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(EpochSummary())
        self.trainer.callbacks.append(RecordEnvironment())  # environment.json in the run's folder
        self.attach_inspection()
        frozen_teacher = getattr(self.model, "frozen_teacher", None)
        if frozen_teacher is not None:
            print_rank_zero(frozen_teacher.describe())

    def before_validate(self) -> None:
        self.check_before_writing()
        self.attach_inspection()

    def before_test(self) -> None:
        self.check_before_writing()
        self.attach_inspection()

    def before_predict(self) -> None:
        self.check_before_writing()

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


#: ``--ckpt_path`` values Lightning resolves itself
_SPECIAL_CKPT = ("last", "best", "hpc")
#: how many missing / unexpected keys a message names
_SHOWN = 5


def _is_special(ckpt) -> bool:
    return not ckpt or ckpt in _SPECIAL_CKPT or str(ckpt).startswith("registry")


#: checkpoint files found readable in this process: (path, size, mtime), so that a large file's
#: checksums are verified once, not at each place that looks at ``--ckpt_path``
_readable: set[tuple[str, int, int]] = set()


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
    """A ``--ckpt_path`` that is missing, truncated, not a checkpoint or holds an object that is
    not plain data stops the run before anything is written (not with a traceback from deep
    inside Lightning). The file is read as Lightning will read it, with
    ``torch.load(weights_only=True)`` (its tensors mapped, not read), so nothing in it runs."""
    if _is_special(ckpt):
        return
    path = Path(ckpt)
    label = f"--ckpt_path {ckpt}"
    if not path.is_file():
        raise KDConfigError(f"{label} does not exist; give a checkpoint file, e.g. "
                            f"runs/<name>/version_N/checkpoints/last.ckpt.")
    stat = path.stat()
    identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if identity in _readable:
        return
    if stat.st_size and raw_pickle(path):
        raise KDConfigError(
            f"{label} is a raw pickle (pickle.dump), not a checkpoint written by torch.save, and "
            f"is not loaded (unpickling it could run code); give a checkpoint written by "
            f"`kd-lightning fit` (runs/<name>/version_N/checkpoints/last.ckpt).")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise KDConfigError(f"{label} is not a readable checkpoint ({err}); it may be "
                            f"truncated (a copy or a save that was cut short) or not a file "
                            f"written by Lightning.") from None
    if broken is not None:
        raise KDConfigError(f"{label} is damaged (its entry {broken} fails its "
                            f"checksum); use an earlier checkpoint of the run.")
    _lightning_state(ckpt)
    _readable.add(identity)


def _lightning_state(ckpt: str) -> dict:
    """The checkpoint at ``ckpt`` (tensors memory-mapped): a Lightning checkpoint's dictionary
    with a ``state_dict``, or :class:`KDConfigError`."""
    label = f"--ckpt_path {ckpt}"
    obj = read_checkpoint(
        ckpt, label=label, allow_namespace=False, mmap=True,
        trusted_advice="Resume or evaluate only from a checkpoint written by `kd-lightning fit` "
                       "(runs/<name>/version_N/checkpoints/last.ckpt or best.ckpt).")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        found = f"a dict with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, dict) \
            else type(obj).__name__
        raise KDConfigError(
            f"{label} is not a Lightning checkpoint (it holds {found}, no 'state_dict'): a run "
            f"resumes or is evaluated only from a checkpoint of `kd-lightning fit`. Network "
            f"weights alone (a plain state_dict) are loaded as a teacher with "
            f"model.init_args.teacher_checkpoint.")
    return obj


def checkpoint_method(ckpt: str) -> str | None:
    """The ``class_path`` of the method that wrote the checkpoint (``None``: not recorded)."""
    method = _lightning_state(ckpt).get("hyper_parameters", {}).get("_class_path")
    return method if isinstance(method, str) else None


def _same_class(a: str, b: str) -> bool:
    """Whether two class paths name the same class (``pkg.Cls`` and ``pkg.mod.Cls`` alike)."""
    if a == b:
        return True
    try:
        resolved = [getattr(importlib.import_module(p.rsplit(".", 1)[0]), p.rsplit(".", 1)[1])
                    for p in (a, b)]
    except (ImportError, AttributeError, ValueError, IndexError):
        return False
    return resolved[0] is resolved[1]


def hold_back_foreign_checkpoint(config) -> tuple[str, str] | None:
    """Check the subcommand's ``ckpt_path`` (also when a config file gives it). When the
    checkpoint was written by another method than the configured one, remove ``ckpt_path``
    from ``config`` until the classes are built and return ``(ckpt_path, method)``: LightningCLI
    would otherwise build the checkpoint's method in place of the configured one (it applies
    a checkpoint's saved hyperparameters, class included), and the comparison of the networks
    (:func:`check_checkpoint_fits`) is against the configured model."""
    subcommand = config.get("subcommand") if hasattr(config, "get") else None
    sub = config.get(subcommand) if subcommand else None
    if sub is None or _is_special(sub.get("ckpt_path")):
        return None
    ckpt = str(sub.get("ckpt_path"))
    check_checkpoint_path(ckpt)
    written_by = checkpoint_method(ckpt)
    configured = getattr(sub.get("model"), "class_path", None)
    if written_by is None or configured is None or _same_class(written_by, configured):
        return None
    sub["ckpt_path"] = None
    return ckpt, written_by


def check_checkpoint_fits(model, ckpt: str, written_by: str | None = None) -> None:
    """``--ckpt_path``'s weights must fit ``model`` as Lightning will load them (strictly, unless
    the model sets ``strict_loading = False``): same keys, same shapes. Otherwise one paragraph
    names the first mismatching key with both shapes, or the first missing and unexpected keys.

    Keys under a name the model has no weights for yet are not counted as unexpected: a method
    builds some modules when training starts (connectors, CRD's memory bank), and Lightning
    checks those keys itself when it loads the checkpoint."""
    state = _lightning_state(ckpt)["state_dict"]
    own = model.state_dict()
    strict = getattr(model, "strict_loading", True) is not False
    built = {key.split(".", 1)[0] for key in own}
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own and k.split(".", 1)[0] in built] if strict else []
    if not (mismatched or missing or unexpected):
        return

    def listing(keys: list[str], source: dict) -> str:
        shown = ", ".join(f"'{k}' {tuple(source[k].shape)}" for k in keys[:_SHOWN])
        return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOWN else ''})"

    name = type(model).__name__
    parts = []
    if mismatched:
        key = mismatched[0]
        parts.append(f"first mismatching key '{key}' has shape {tuple(state[key].shape)} in the "
                     f"checkpoint but {tuple(own[key].shape)} in the model"
                     + (f" ({len(mismatched)} keys differ in shape)" if len(mismatched) > 1 else ""))
    if missing:
        parts.append(f"keys of the model missing from the checkpoint: {listing(missing, own)}")
    if unexpected:
        parts.append(f"unexpected keys in the checkpoint: {listing(unexpected, state)}")
    origin = ""
    if written_by is not None:
        origin = (f" The checkpoint was written by {written_by}, the configured model is "
                  f"{type(model).__module__}.{type(model).__qualname__}; a teacher's checkpoint is "
                  f"given as model.init_args.teacher_checkpoint, not as --ckpt_path.")
    raise KDConfigError(
        f"--ckpt_path {ckpt} holds the weights of another network than the configured model "
        f"({name}): {'; '.join(parts)}.{origin} A run resumes (or is evaluated) only from a "
        f"checkpoint of the same method and networks: configure the student (and teacher) the "
        f"checkpoint was trained with, or give that run's own checkpoint.")


def install_atomic_checkpoints(trainer, plugins=None) -> None:
    """Write the trainer's checkpoints atomically (:class:`~kd_lightning.training.checkpoint_io.
    AtomicCheckpointIO`) when its strategy uses Lightning's plain ``TorchCheckpointIO`` by
    default; a checkpoint IO given in ``plugins`` (the trainer's ``plugins`` argument) or with
    the strategy is kept."""
    given = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(plugin, CheckpointIO) for plugin in given):
        return
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def check_log_folder(config) -> None:
    """The logger's folder must be writable before training starts, not after the first epoch.
    Nothing is created here: the nearest existing folder on the way must let the logger create
    the rest."""
    logger = config.get("trainer", {}).get("logger")
    save_dir = getattr(getattr(logger, "init_args", None), "save_dir", None)
    if not save_dir:
        return
    folder = Path(save_dir).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise KDConfigError(f"the log folder {save_dir} cannot be created ({existing} is not a "
                            f"folder); set --trainer.logger.init_args.save_dir to a folder you "
                            f"can write.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KDConfigError(f"the log folder {save_dir} is not writable ({existing} is not); set "
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
    except CheckpointWriteError as err:
        print(f"kd-lightning: error: {err.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
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
