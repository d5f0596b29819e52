"""One plain-text line per training epoch, for runs without a progress bar (batch jobs, logs)."""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour)."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class EpochSummary(Callback):
    """Prints ``epoch 3/20  train/loss 0.1234  val/acc 0.9812  elapsed 2:05`` after every
    training epoch (on rank 0).

    ``train/loss`` is the mean of the epoch's training losses (the module's
    :class:`~kd_lightning.training.TermLog`), ``val/acc`` the accuracy of the validation run at the
    end of the epoch (left out when none ran), ``elapsed`` the wall time since the fit started.
    The CLI attaches it when the progress bar is off (``--trainer.enable_progress_bar false``).
    """

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._mark: dict | None = None
        self._val_acc: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._start = time.monotonic()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module) -> None:
        term_log = getattr(pl_module, "term_log", None)
        self._mark = term_log.mark() if term_log is not None else None
        self._val_acc = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/acc")
        self._val_acc = float(value) if value is not None else None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        # (runs before the term log closes its window at the end of the epoch)
        parts = [f"epoch {trainer.current_epoch + 1}"
                 + (f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else "")]
        term_log = getattr(pl_module, "term_log", None)
        loss = term_log.mean("loss", self._mark) if term_log is not None else None
        if loss is not None:
            loss = float(trainer.strategy.reduce(loss.to(pl_module.device), reduce_op="mean"))
            parts.append(f"train/loss {loss:.4f}" if math.isfinite(loss) else f"train/loss {loss}")
        if self._val_acc is not None:
            parts.append(f"val/acc {self._val_acc:.4f}")
        parts.append(f"elapsed {format_duration(time.monotonic() - self._start)}")
        rank_zero_info("  ".join(parts))
