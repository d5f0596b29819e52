"""Per-window logging of named loss terms.

Lightning's ``self.log`` costs far more than a training step of a small model, and in few-data
runs an epoch can be a single step. So a step only keeps references to its detached terms and
its predicted classes (one ``argmax``, no host-device synchronisation); at the end of an epoch in
which at least ``log_every_n_steps`` optimizer steps have passed (or at a stage boundary, or at
the last epoch) the means over the window are logged once, as ``train/<name>`` (averaged over
DDP ranks) and ``train/acc`` (accuracy over the window's labelled examples: unlabelled ones,
``y = -1``, have no class to be right about).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.losses.labels import labelled_mask


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

    def mark(self) -> dict:
        """A bookmark of what was recorded so far (for :meth:`mean` and :meth:`accuracy` over
        the steps after it)."""
        return {**{key: len(records) for key, records in self._records.items()}, "preds": len(self._preds)}

    def mean(self, name: str, since: dict | None = None) -> Tensor | None:
        """Mean of term ``name`` over this window's steps recorded after the bookmark ``since``
        (all of them without one); ``None`` if none of them has the term. With a bookmark taken
        when an epoch began, this is the epoch's mean."""
        since = since or {}
        values = [record[names.index(name)] for names, records in self._records.items()
                  if name in names for record in records[since.get(names, 0):]]
        return torch.stack(values).float().mean() if values else None

    def accuracy(self, since: dict | None = None) -> Tensor | None:
        """Accuracy over the labelled examples of the steps recorded after the bookmark ``since``
        (all of them without one); ``None`` if there are none."""
        preds = self._preds[(since or {}).get("preds", 0):]
        if not preds:
            return None
        predicted, targets = torch.cat([p for p, _ in preds]), torch.cat([t for _, t in preds])
        labelled = labelled_mask(targets)
        return ((predicted == targets) & labelled).sum().float() / labelled.sum().clamp_min(1)

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
            # DDP shards are padded to equal size, so the mean over ranks is the global accuracy
            # (without unlabelled examples; with them, the mean of the ranks' accuracies). A
            # window without a labelled example reports 0 rather than nan (which would stop
            # training as diverged); with batches of unlabelled and labelled examples mixed at
            # random this needs a window in which no labelled example was drawn at all.
            out["train/acc"] = self.accuracy()
        return out



class TrainingDiverged(KDConfigError):
    """A loss term or a weight became nan or inf."""


_DIVERGED_FIXES = ("Usual fixes: a lower learning rate, gradient clipping "
                   "(--trainer.gradient_clip_val), 32-bit precision, or inputs on a smaller scale "
                   "(data.normalize).")


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
                    f"{pl_module.current_epoch}). {_DIVERGED_FIXES}")
            pl_module.log_dict(means, on_step=False, on_epoch=True, sync_dist=True)
        log.reset(trainer.global_step)
        pl_module.on_train_terms_logged()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        """No checkpoint of a diverged state: the terms since the last logged window and every
        weight and buffer of the module must be finite, else :class:`TrainingDiverged` (the file is not written).
        Costs one check per checkpoint, nothing per step."""
        log = pl_module.term_log
        bad = [name for name, value in log.means().items()
               if name != "train/acc" and not bool(torch.isfinite(value))]
        if bad:
            raise TrainingDiverged(
                f"training diverged: {', '.join(bad)} became nan or inf between global steps "
                f"{log.opened_at_step} and {trainer.global_step} (epoch {pl_module.current_epoch}); "
                f"no checkpoint was written. {_DIVERGED_FIXES}")
        for name, value in checkpoint.get("state_dict", {}).items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise TrainingDiverged(
                    f"training diverged: {name} became nan or inf by global step "
                    f"{trainer.global_step} (epoch {pl_module.current_epoch}); no checkpoint was "
                    f"written. {_DIVERGED_FIXES}")
