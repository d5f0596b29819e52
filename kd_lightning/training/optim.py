"""Optimizer and LR-scheduler helpers shared by every method.

- :func:`use_fused_kernel`: the same optimizer with torch's fused kernel (opt-in).
- :func:`build_lr_scheduler`: the configured scheduler, with the run's length filled in where the
  schedule needs it (OneCycleLR's ``total_steps``).
- :func:`lr_scheduler_config`: Lightning's scheduler dictionary for a configured scheduler.
- :func:`step_lr_schedulers`: the scheduler stepping Lightning does in automatic optimisation
  (interval, frequency, ReduceLROnPlateau's monitored metric), for optimisation a module does
  itself (grouped minibatches, MutualDistillation).
- :func:`configured_optimizer`, :func:`configured_lr_scheduler`: what a
  :class:`~kd_lightning.methods.DistillationModule`'s ``optimizer``, ``fused_optimizer`` and
  ``lr_scheduler`` arguments build; :func:`manual_optimizer_step` and
  :func:`step_manual_lr_schedulers`: the steps of a module that optimises itself.
"""

from __future__ import annotations

import functools
import inspect
import math

import pytorch_lightning as pl
import torch

from kd_lightning import KDConfigError
from kd_lightning.training.epochs import batches_per_step, minibatches_per_epoch
from kd_lightning.training.lightning_compat import attached_trainer, fused_kernel_devices

ReduceLROnPlateau = torch.optim.lr_scheduler.ReduceLROnPlateau


def use_fused_kernel(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer rebuilt with ``fused=True`` when that is possible and was left unset.

    Eligible: a fresh optimizer (no state) whose class accepts ``fused``, with ``fused`` and
    ``foreach`` both left at ``None``, not ``differentiable``, and every parameter a floating
    tensor on a device with fused kernels. Anything else is returned unchanged. The fused kernel
    computes the same update in one call instead of a Python loop over parameters, but rounds
    differently, so it is opt-in (``fused_optimizer: true``).
    """
    defaults = optimizer.defaults
    if optimizer.state or "fused" not in inspect.signature(type(optimizer).__init__).parameters:
        return optimizer
    if defaults.get("fused") is not None or defaults.get("foreach") is not None:
        return optimizer
    if defaults.get("differentiable") or defaults.get("capturable"):
        return optimizer
    devices = fused_kernel_devices()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params or not all(p.device.type in devices and torch.is_floating_point(p) for p in params):
        return optimizer
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    kwargs = {k: v for k, v in defaults.items() if k not in ("fused", "foreach")}
    try:
        return type(optimizer)(groups, **{**kwargs, "fused": True})
    except (RuntimeError, ValueError, TypeError):
        return optimizer


def scheduler_steps_in_fit(trainer: pl.Trainer, interval: str) -> int:
    """How often a scheduler of ``interval`` ("step" or "epoch") is stepped in this fit: optimizer
    steps (as ``trainer.estimated_stepping_batches`` counts them, with every minibatch of a fit
    with ``data.batches_per_step > 1`` counted) or epochs, both within ``max_steps``."""
    steps = trainer.estimated_stepping_batches  # (loads the training data if needed)
    k = batches_per_step(trainer)
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else math.inf
    per_epoch = trainer.num_training_batches / trainer.accumulate_grad_batches
    if k > 1:  # a Lightning step trains k minibatches, one optimizer step each
        per_epoch = minibatches_per_epoch(trainer, k)
        steps = per_epoch * epochs if trainer.max_steps <= 0 else min(per_epoch * epochs, trainer.max_steps)
    per_epoch = math.ceil(per_epoch) if math.isfinite(per_epoch) else per_epoch
    if interval == "epoch":
        steps = epochs if trainer.max_steps <= 0 else min(epochs, math.ceil(steps / max(per_epoch, 1)))
    if not math.isfinite(steps):
        raise KDConfigError(
            "the length of this run is unknown (no trainer.max_epochs or trainer.max_steps, or a "
            "training loader without a length), so the scheduler's length cannot be filled in: "
            "set trainer.max_epochs or trainer.max_steps, or the scheduler's length (total_steps).")
    return int(steps)


def _scheduler_class_and_args(factory) -> tuple[type | None, dict]:
    """The scheduler class a factory builds and the keyword arguments it was given."""
    if isinstance(factory, type):
        return factory, {}
    if isinstance(factory, functools.partial):  # jsonargparse's LRSchedulerCallable is one
        cls = next((a for a in (factory.func, *factory.args) if isinstance(a, type)), None)
        return cls, dict(factory.keywords)
    return None, {}


def build_lr_scheduler(factory, optimizer: torch.optim.Optimizer, trainer: pl.Trainer | None,
                       interval: str):
    """``factory(optimizer)``, with the run's length given to schedules that need it.

    ``OneCycleLR`` (Smith & Topin 2019) without ``total_steps`` (and without ``epochs`` and
    ``steps_per_epoch``) gets ``total_steps`` = the number of times it will be stepped in this
    fit (:func:`scheduler_steps_in_fit`), which changes with ``data.val_split``,
    ``data.train_subset``, the batch size and the number of devices. A ``total_steps`` given by
    hand that is smaller than that is refused before training (OneCycleLR would fail midway).
    Without a trainer (a module used outside a fit) the factory is called as it is.
    """
    cls, kwargs = _scheduler_class_and_args(factory)
    one_cycle = cls is not None and issubclass(cls, torch.optim.lr_scheduler.OneCycleLR)
    if trainer is None or not one_cycle:
        return factory(optimizer)
    needed = scheduler_steps_in_fit(trainer, interval)
    unit = "optimizer steps" if interval == "step" else "epochs"
    given = kwargs.get("epochs") and kwargs.get("steps_per_epoch")
    if kwargs.get("total_steps") is None and not given:
        return factory(optimizer, total_steps=needed)
    scheduler = factory(optimizer)
    if scheduler.total_steps < needed:
        raise KDConfigError(
            f"OneCycleLR has total_steps={scheduler.total_steps} but this fit steps it {needed} times "
            f"({unit}, lr_scheduler_interval={interval!r}); it would fail when the cycle ends. Leave "
            f"total_steps (and epochs, steps_per_epoch) unset to use the run's length, or give at "
            f"least {needed}.")
    return scheduler


def lr_scheduler_config(scheduler, interval: str, monitor: str | None) -> dict:
    """Lightning's scheduler dictionary: ``interval`` ("epoch" or "step"), and ``monitor`` for a
    ReduceLROnPlateau scheduler (``None`` under manual optimisation, where Lightning ignores the
    key and :func:`step_lr_schedulers` finds the metric)."""
    config = {"scheduler": scheduler, "interval": interval}
    if monitor is not None and isinstance(scheduler, ReduceLROnPlateau):
        config["monitor"] = monitor
    return config


def step_lr_schedulers(trainer: pl.Trainer, interval: str, count: int, plateau: bool = False,
                       default_monitor: str = "val/loss", strict: bool = True) -> None:
    """Step the schedulers of ``interval`` whose ``frequency`` divides ``count``, as Lightning's
    automatic optimisation does: the plain ones (``plateau=False``) or the ReduceLROnPlateau ones
    with their monitored metric (``plateau=True``). ``strict=False`` skips a plateau scheduler
    whose metric was not logged yet instead of raising."""
    for config in trainer.lr_scheduler_configs:
        # under manual optimisation Lightning drops the reduce_on_plateau/monitor keys: ask the scheduler
        is_plateau = isinstance(config.scheduler, ReduceLROnPlateau)
        if config.interval != interval or is_plateau != plateau or count % config.frequency:
            continue
        if not plateau:
            config.scheduler.step()
            continue
        monitor = config.monitor or default_monitor
        value = trainer.callback_metrics.get(monitor)
        if value is None:
            if strict:
                raise KDConfigError(
                    f"ReduceLROnPlateau monitors {monitor!r}, which was not logged "
                    f"(available: {sorted(trainer.callback_metrics)}); run validation every epoch "
                    f"or use another scheduler.")
            continue
        config.scheduler.step(value)


def configured_optimizer(module, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``module``'s configured optimizer over ``params`` (its fused kernel with
    ``fused_optimizer``, see :func:`use_fused_kernel`)."""
    optimizer = module.optimizer_factory(params)
    return use_fused_kernel(optimizer) if module.fused_optimizer else optimizer


def configured_lr_scheduler(module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Lightning's scheduler config for ``module``'s configured LR scheduler on ``optimizer``
    (``None`` without one); a ReduceLROnPlateau follows ``module.plateau_monitor``."""
    if module.lr_scheduler_factory is None:
        return None
    monitor = module.plateau_monitor if module.automatic_optimization else None
    interval = module.hparams.lr_scheduler_interval
    scheduler = build_lr_scheduler(module.lr_scheduler_factory, optimizer, attached_trainer(module), interval)
    return lr_scheduler_config(scheduler, interval, monitor)


def manual_optimizer_step(module, optimizer, loss: torch.Tensor, counted: bool = True) -> None:
    """Backward ``loss`` and step ``optimizer`` (a LightningOptimizer) under manual optimisation.
    A ``counted`` step is a training step (``global_step``); the others (auxiliary optimizers,
    further peers) take the same strategy/precision path uncounted."""
    optimizer.zero_grad(set_to_none=True)
    module.manual_backward(loss)
    if counted:
        optimizer.step()
    else:
        module.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)


def _no_closure() -> None:
    """The closure of an uncounted manual step: the gradients are already there."""
    return None


def step_manual_lr_schedulers(module, interval: str, count: int) -> None:
    """For a module that optimises itself: step this interval's schedulers; a ReduceLROnPlateau
    only once its metric (``module.plateau_monitor`` by default) exists (skipped before, not an
    error)."""
    step_lr_schedulers(module.trainer, interval, count)
    step_lr_schedulers(module.trainer, interval, count, plateau=True,
                       default_monitor=module.plateau_monitor, strict=False)
