"""Several minibatches per Lightning step (``data.batches_per_step = k``).

Lightning's per-step bookkeeping costs more than a training step of a small model, so the data
module can hand over ``k`` consecutive minibatches per Lightning step (exactly the minibatches a
``k = 1`` loader gives, in the same order). The optimizer still steps once per minibatch:

- :class:`GroupedOptimization` (a callback every :class:`~kd_lightning.methods.DistillationModule`
  attaches) switches the module to manual optimisation for a fit with ``k > 1``, clips gradients
  where Lightning's automatic optimisation clips them (after AMP unscaling, before the step) and
  steps ReduceLROnPlateau schedulers after validation;
- :func:`run_group` trains the ``k`` minibatches of one Lightning step through Lightning's
  manual-optimisation API, with the hooks automatic optimisation calls (``on_before_zero_grad``,
  ``optimizer_zero_grad``, ``optimizer_step`` with a closure, backward hooks), so precision
  plugins, DDP gradient all-reduce, callbacks and ``global_step`` behave as with ``k = 1``, and
  the student is bit-identical to a ``k = 1`` run;
- :class:`GroupedSteps` (a base of :class:`~kd_lightning.methods.DistillationModule`) reports
  the optimisation mode of the current fit to Lightning;
- :func:`move_batch` moves a batch, or a group of minibatches, to the device in one call (the
  data module's ``transfer_batch_to_device``: the hook belongs to the data module, which makes
  the batches, and a module overriding it beside a data module is a configuration Lightning warns
  about).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from kd_lightning import KDConfigError
from kd_lightning.training.epochs import batches_per_step
from kd_lightning.training.optim import step_lr_schedulers


@dataclass(frozen=True)
class GroupedFit:
    """How the current fit trains: ``k`` minibatches per Lightning step; ``drives_optimizer``
    when the module uses automatic optimisation, which :func:`run_group` then carries out."""

    k: int
    drives_optimizer: bool


class GroupedOptimization(Callback):
    """Sets up and completes grouped training for the module's fit (see the module docstring)."""

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        k = batches_per_step(trainer)
        if k > 1 and trainer.accumulate_grad_batches != 1:
            raise KDConfigError(
                f"data.batches_per_step={k} cannot be combined with trainer.accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}: set data.batches_per_step to 1 (or raise "
                f"data.batch_size instead of accumulating).")
        pl_module.grouped_fit = GroupedFit(k, pl_module.declared_automatic_optimization) if k > 1 else None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module, optimizer) -> None:
        group = pl_module.grouped_fit
        if group is not None and group.drives_optimizer and trainer.gradient_clip_val:
            pl_module.configure_gradient_clipping(optimizer, trainer.gradient_clip_val,
                                                  trainer.gradient_clip_algorithm)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        group = pl_module.grouped_fit
        if group is not None and group.drives_optimizer:  # after validation, as Lightning does
            step_lr_schedulers(trainer, "epoch", pl_module.current_epoch + 1, plateau=True,
                               default_monitor=pl_module.plateau_monitor)


def run_group(module, group: list, batch_idx: int,
              minibatch_step: Callable[[tuple, int], Tensor | None]) -> None:
    """Train the minibatches of one Lightning step; ``minibatch_step(batch, index)`` returns the
    loss to minimise (automatic-optimisation methods) or optimises itself and returns anything."""
    trainer = module.trainer
    k = module.grouped_fit.k
    drives = module.grouped_fit.drives_optimizer
    optimizer = module.optimizers() if drives else None
    for j, minibatch in enumerate(group):
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # max_steps counts optimizer steps, not groups
        index = batch_idx * k + j
        loss = minibatch_step(minibatch, index)
        if optimizer is None or loss is None:
            continue

        def closure(loss=loss, index=index) -> Tensor:
            for callback in trainer.callbacks:
                callback.on_before_zero_grad(trainer, module, optimizer)
            module.on_before_zero_grad(optimizer)
            module.optimizer_zero_grad(module.current_epoch, index, optimizer)
            module.manual_backward(loss)
            return loss

        module.optimizer_step(module.current_epoch, index, optimizer, closure)
        step_lr_schedulers(trainer, "step", index + 1)
    if drives and batch_idx + 1 == trainer.num_training_batches:
        step_lr_schedulers(trainer, "epoch", module.current_epoch + 1)


def move_batch(batch, device):
    """An ``(x, y, index)`` batch, or a group of them, on ``device`` (returned as it is when it
    is there already); ``None`` for any other batch structure."""
    if isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) for t in batch):
        if all(t.device == device for t in batch):
            return batch
        return type(batch)(t.to(device, non_blocking=True) for t in batch)
    if isinstance(batch, list) and all(isinstance(b, (tuple, list)) for b in batch):
        moved = [move_batch(b, device) for b in batch]
        return None if any(m is None for m in moved) else moved
    return None


class GroupedSteps:
    """The grouped-fit side of a LightningModule (a base class placed before
    ``pl.LightningModule``): the optimisation mode Lightning sees. :class:`GroupedOptimization`
    sets ``grouped_fit`` (``None`` outside a grouped fit)."""

    #: set by :class:`GroupedOptimization` for a fit with ``data.batches_per_step > 1``
    grouped_fit: GroupedFit | None = None
    #: the optimisation mode the module declares (``self.automatic_optimization = ...``)
    declared_automatic_optimization: bool = True

    @property
    def automatic_optimization(self) -> bool:
        """Lightning optimises (``True``) unless the module optimises itself or this fit trains
        several minibatches per step (then :func:`run_group` does)."""
        return self.declared_automatic_optimization and self.grouped_fit is None

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self.declared_automatic_optimization = value
