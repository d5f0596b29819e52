"""The length of a fit: minibatches per epoch, and schedules given in epochs.

- :func:`batches_per_step` and :func:`minibatches_per_epoch`: how many minibatches (optimizer
  steps) a training epoch has when the data module groups ``k`` of them per Lightning step.
- :func:`check_epochs` and :func:`resolve_epochs`: a schedule length in epochs (a two-stage
  method's first stage, a warm-up) given as an ``int`` number of epochs or as a ``float`` in
  ``[0, 1)``, that fraction of ``trainer.max_epochs``, so a configuration keeps its proportions
  when ``--trainer.max_epochs`` changes.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl

from kd_lightning import KDConfigError


def batches_per_step(trainer: pl.Trainer) -> int:
    """``data.batches_per_step`` of the trainer's data module (1 without one)."""
    dm = getattr(trainer, "datamodule", None)
    return int(getattr(dm, "batches_per_step", 1) or 1)


def minibatches_per_epoch(trainer: pl.Trainer, k: int) -> float:
    """Optimizer-step minibatches per training epoch (per device) with ``k`` minibatches per
    Lightning step; ``inf`` when unknown."""
    n = trainer.num_training_batches
    if k == 1 or not math.isfinite(n):
        return n
    dm = trainer.datamodule
    sampler = getattr(trainer.train_dataloader, "sampler", None)  # per rank under DDP
    per_rank = len(sampler) if hasattr(sampler, "__len__") else n * k * dm.batch_size
    full = per_rank // dm.batch_size if dm.drop_last else math.ceil(per_rank / dm.batch_size)
    return min(n * k, full)


def check_epochs(value, name: str, method: str) -> None:
    """``value`` must be an ``int >= 0`` (epochs) or a ``float`` in ``[0, 1)`` (a fraction of
    ``trainer.max_epochs``); ``name`` and ``method`` say whose argument it is in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise KDConfigError(f"{method}: {name} must be an integer >= 0 (epochs) or a float in "
                            f"[0, 1) (a fraction of max_epochs), got {value!r}.")
    if isinstance(value, float) and value >= 1.0:
        raise KDConfigError(
            f"{method}: {name}={value} is a float, which means a fraction of max_epochs and must "
            f"be in [0, 1). Give a number of epochs as an integer (e.g. {int(value)}).")


def resolve_epochs(value, max_epochs: int | None, name: str, method: str, *,
                   exact: bool = False) -> int | float:
    """``value`` (see :func:`check_epochs`) in epochs of a fit of ``max_epochs``.

    An ``int`` is returned as it is. A fraction ``f`` gives ``f * max_epochs``, rounded to the
    nearest epoch (halves up; a fraction that rounds to 0 gives 0), or unrounded with
    ``exact=True`` (for a ramp, such as a linear warm-up, that may end within an epoch). A
    fraction needs ``max_epochs`` (``None`` or ``-1`` is refused).
    """
    check_epochs(value, name, method)
    if isinstance(value, int):
        return value
    if max_epochs is None or max_epochs < 0:
        raise KDConfigError(f"{method}: {name}={value} is a fraction of trainer.max_epochs, which "
                            f"is not set; set trainer.max_epochs or give {name} in epochs (an "
                            f"integer).")
    epochs = value * max_epochs
    return epochs if exact else int(math.floor(epochs + 0.5))
