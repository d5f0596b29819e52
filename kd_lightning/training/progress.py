"""What a run prints while it trains: a live bar in a terminal, one line per epoch everywhere else.

A batch job's log (stdout redirected to a file, as under SLURM) cannot show a live bar: Lightning's
bars then print once, when the run ends. :func:`console_progress_bar` therefore picks, for a run
whose stdout is not a terminal, :class:`EpochLines`, which prints (and flushes) one line per
training epoch and one per validation that does not end an epoch::

    epoch 3/20  step 120  train/loss 0.1234  train/loss_ce 0.1000  train/acc 0.9512  val/loss 0.2101  val/acc 0.9400  lr 9.76e-03  elapsed 0:41

A fit of more than :data:`MAX_EPOCH_LINES` epochs (a few-data run of hundreds of one-step epochs)
prints the first epoch, every ``k``-th with ``k = ceil(max_epochs / MAX_EPOCH_LINES)``, and the
last, so its log stays readable and the lines cost nothing next to the steps.

``train/...``: the means of the method's loss terms over the epoch's steps (the module's
:class:`~kd_lightning.training.TermLog`, averaged over DDP ranks) and the accuracy over its
labelled training examples; ``val/...``: the validation at the end of the epoch (absent when
none ran); ``lr``: the learning rate the epoch trained with (each optimizer's, when there are
several); ``elapsed``: wall time since the fit started. A terminal keeps Lightning's live bar
(Rich, else tqdm) without its ``v_num`` entry (the logger's version folder, not a metric). With
``--trainer.enable_progress_bar false`` :class:`EpochSummary` prints the same lines.
"""

from __future__ import annotations

import math
import sys
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ProgressBar, RichProgressBar, TQDMProgressBar
from pytorch_lightning.trainer.states import TrainerFn


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_value(value: float) -> str:
    """Four decimals, or three significant digits in scientific notation for very small or large
    values (``nan``/``inf`` as they are)."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.2e}"
    return f"{value:.4f}"


#: most epoch lines of one fit (see the module docstring)
MAX_EPOCH_LINES = 100


def _line_due(trainer: pl.Trainer) -> bool:
    """Whether the epoch now ending gets its line: every epoch of a fit of at most
    :data:`MAX_EPOCH_LINES` epochs; else the first, every ``k``-th and the last (decided from the
    epoch and step counts alone, so every DDP rank agrees and joins the means' reduction)."""
    total, epoch = trainer.max_epochs, trainer.current_epoch + 1
    if total is None or total < 0 or total <= MAX_EPOCH_LINES:
        return True
    last = epoch >= total or 0 < trainer.max_steps <= trainer.global_step
    return epoch == 1 or epoch % math.ceil(total / MAX_EPOCH_LINES) == 0 or last


def _metric_order(name: str) -> tuple[int, str]:
    # loss first, then accuracy, then the rest in name order
    return ({"loss": 0, "acc": 1}.get(name.split("/", 1)[-1], 2), name)


class _EpochLineHooks:
    """The hooks behind the per-epoch lines, shared by :class:`EpochSummary` (a callback) and
    :class:`EpochLines` (a progress bar). Every rank computes the values (the epoch means are
    averaged over DDP ranks, a collective); only an instance whose :meth:`_emits` is true
    prints."""

    def _reset_lines(self) -> None:
        self._start = time.monotonic()
        self._mark: dict | None = None
        self._val: dict[str, float] | None = None

    def _emits(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero

    def _emit(self, trainer: pl.Trainer, parts: list[str]) -> None:
        if self._emits(trainer):
            print("  ".join(parts), file=sys.stdout, flush=True)

    def _where(self, trainer: pl.Trainer) -> list[str]:
        epoch = f"epoch {trainer.current_epoch + 1}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            epoch += f"/{trainer.max_epochs}"
        return [epoch, f"step {trainer.global_step}"]

    def _elapsed(self) -> str:
        return f"elapsed {format_duration(time.monotonic() - self._start)}"

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._reset_lines()

    def on_validation_start(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._start = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        term_log = getattr(pl_module, "term_log", None)
        self._mark = term_log.mark() if term_log is not None else None
        self._val = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith("val/") and torch.as_tensor(v).numel() == 1}
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._val = values  # the validation that ends the epoch: on the epoch's line
            return
        parts = ["validation", *(self._where(trainer) if fitting else [])]
        parts += [f"{k} {format_value(values[k])}" for k in sorted(values, key=_metric_order)]
        self._emit(trainer, [*parts, self._elapsed()])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        # (callbacks passed to the trainer run before the term log closes its window at the end
        # of the epoch, so the window still holds this epoch's steps)
        if not _line_due(trainer):
            return
        parts = self._where(trainer)
        train = _epoch_means(trainer, pl_module, self._mark)
        parts += [f"{k} {format_value(train[k])}" for k in train]
        val = self._val or {}
        parts += [f"{k} {format_value(val[k])}" for k in sorted(val, key=_metric_order)]
        rates = learning_rates(trainer)
        if rates:
            parts.append("lr " + "/".join(f"{lr:.2e}" for lr in rates))
        self._emit(trainer, [*parts, self._elapsed()])


def _epoch_means(trainer: pl.Trainer, pl_module, mark: dict | None) -> dict[str, float]:
    """``train/<term>`` means and ``train/acc`` over the epoch's steps, averaged over ranks."""
    term_log = getattr(pl_module, "term_log", None)
    if term_log is None:
        return {}
    names = list(dict.fromkeys(term_log.names))
    values = {f"train/{n}": term_log.mean(n, mark) for n in names}
    values["train/acc"] = term_log.accuracy(mark)
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return {}
    stacked = torch.stack([v.float() for v in values.values()]).to(pl_module.device)
    reduced = trainer.strategy.reduce(stacked, reduce_op="mean").tolist()
    return dict(zip(values, reduced))


def learning_rates(trainer: pl.Trainer) -> list[float]:
    """The learning rate of each optimizer's first parameter group."""
    return [float(opt.param_groups[0]["lr"]) for opt in trainer.optimizers if opt.param_groups]


class EpochSummary(_EpochLineHooks, Callback):
    """The per-epoch lines of :class:`EpochLines` for a run without a progress bar
    (``--trainer.enable_progress_bar false``; the CLI attaches it), printed on rank 0."""

    def __init__(self) -> None:
        self._reset_lines()


class EpochLines(_EpochLineHooks, ProgressBar):
    """Lightning's progress bar for a stdout that is not a terminal (a log file, a pipe): one
    flushed line per training epoch and per validation that does not end one (see the module
    docstring), printed by rank 0."""

    def __init__(self) -> None:
        super().__init__()
        self._reset_lines()
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def _emits(self, trainer: pl.Trainer) -> bool:
        return self._enabled and trainer.is_global_zero


class _WithoutVersion:
    """A live bar without ``v_num``: the logger's version folder is not a metric."""

    def get_metrics(self, trainer: pl.Trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class TerminalRichBar(_WithoutVersion, RichProgressBar):
    """Lightning's Rich progress bar without ``v_num``."""


class TerminalTQDMBar(_WithoutVersion, TQDMProgressBar):
    """Lightning's tqdm progress bar without ``v_num``."""


def console_progress_bar(stream=None) -> ProgressBar:
    """The progress bar for a run printing to ``stream`` (default: ``sys.stdout``): Lightning's
    live bar (Rich when installed, else tqdm, as Lightning chooses) for a terminal,
    :class:`EpochLines` for anything else."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return EpochLines()
    try:
        return TerminalRichBar()
    except ModuleNotFoundError:  # rich is not installed
        return TerminalTQDMBar()
