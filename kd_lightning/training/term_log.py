"""Per-window logging of named loss terms.

Lightning's ``self.log`` costs far more than a training step of a small model, and in few-data
runs an epoch can be a single step. So a step only keeps references to its detached terms and
its predicted classes (one ``argmax``, no host-device synchronisation); at the end of an epoch in
which at least ``log_every_n_steps`` optimizer steps have passed (or at a stage boundary, or at
the last epoch) the means over the window are logged once, as ``train/<name>`` (averaged over
DDP ranks) and ``train/acc`` (accuracy over the window's examples).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from kd_lightning import KDConfigError


class TermLog:
    """The loss terms recorded since the last logged window."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, step: int) -> None:
        self._records: dict[tuple[str, ...], list[list[Tensor]]] = {}
        self._preds: list[tuple[Tensor, Tensor]] = []
        self.opened_at_step = step

    @property
    def names(self) -> list[str]:
        """Names of the terms recorded in this window (all stages)."""
        return [n for key in self._records for n in key]

    def record(self, logits: Tensor | None, targets: Tensor | None, terms: dict[str, Tensor]) -> None:
        """Keep this step's detached ``terms`` (and predicted classes, for ``train/acc``)."""
        records = self._records.get(tuple(terms))
        if records is None:
            records = self._records[tuple(terms)] = []
        records.append([v.detach() for v in terms.values()])
        if logits is not None and targets is not None:
            self._preds.append((logits.detach().argmax(-1), targets))

    def window_full(self, trainer: pl.Trainer, epoch: int) -> bool:
        """At least ``log_every_n_steps`` steps since the window opened, or the last epoch."""
        last_epoch = (trainer.max_epochs is not None and trainer.max_epochs > 0
                      and epoch >= trainer.max_epochs - 1) or (
            trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
        return (trainer.global_step - self.opened_at_step >= trainer.log_every_n_steps
                or last_epoch or trainer.should_stop)

    def mark(self) -> dict[tuple[str, ...], int]:
        """A bookmark of what was recorded so far (for :meth:`mean` over the steps after it)."""
        return {key: len(records) for key, records in self._records.items()}

    def mean(self, name: str, since: dict[tuple[str, ...], int] | None = None) -> Tensor | None:
        """Mean of term ``name`` over this window's steps recorded after the bookmark ``since``
        (all of them without one); ``None`` if none of them has the term. With a bookmark taken
        when an epoch began, this is the epoch's mean."""
        since = since or {}
        values = [record[names.index(name)] for names, records in self._records.items()
                  if name in names for record in records[since.get(names, 0):]]
        return torch.stack(values).float().mean() if values else None

    def means(self) -> dict[str, Tensor]:
        """``train/<name>``: each term's mean over the window's steps; ``train/acc``."""
        sums: dict[str, Tensor] = {}
        steps: dict[str, int] = {}
        for names, records in self._records.items():  # the terms may change between stages
            for i, name in enumerate(names):
                total = torch.stack([r[i] for r in records]).float().sum()
                sums[name] = total + sums[name] if name in sums else total
                steps[name] = steps.get(name, 0) + len(records)
        out = {f"train/{name}": total / steps[name] for name, total in sums.items()}
        if self._preds:
            preds = torch.cat([p for p, _ in self._preds])
            targets = torch.cat([t for _, t in self._preds])
            # DDP shards are padded to equal size, so the mean over ranks is the global accuracy
            out["train/acc"] = (preds == targets).float().mean()
        return out



class TrainingDiverged(KDConfigError):
    """A logged loss term became nan or inf."""


class TermLogging(Callback):
    """Logs the module's :class:`TermLog` once per full window, at the end of a training epoch.

    A window also closes where the module's ``log_window_closes()`` says so (a stage boundary,
    so that no logged mean mixes two objectives). After logging, the module's
    ``on_train_terms_logged()`` hook runs. A term that was nan or inf stops training with
    :class:`TrainingDiverged` (instead of a run that ends "successfully" with a nan loss).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module) -> None:
        pl_module.term_log.reset(trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        log = pl_module.term_log
        if not (log.window_full(trainer, pl_module.current_epoch) or pl_module.log_window_closes()):
            return
        means = log.means()
        if means:
            finite = torch.isfinite(torch.stack(list(means.values())))
            if not bool(finite.all()):
                bad = [k for k, ok in zip(means, finite.tolist()) if not ok]
                raise TrainingDiverged(
                    f"training diverged: {', '.join(bad)} became nan or inf between global steps "
                    f"{log.opened_at_step} and {trainer.global_step} (epoch "
                    f"{pl_module.current_epoch}). Usual fixes: a lower learning rate, gradient "
                    f"clipping (--trainer.gradient_clip_val), 32-bit precision, or inputs on a "
                    f"smaller scale (data.normalize).")
            pl_module.log_dict(means, on_step=False, on_epoch=True, sync_dist=True)
        log.reset(trainer.global_step)
        pl_module.on_train_terms_logged()
