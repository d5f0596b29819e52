"""Optimizer and LR-scheduler helpers shared by every method.

- :func:`use_fused_kernel`: the same optimizer with torch's fused kernel (opt-in).
- :func:`lr_scheduler_config`: Lightning's scheduler dictionary for a configured scheduler.
- :func:`step_lr_schedulers`: the scheduler stepping Lightning does in automatic optimisation
  (interval, frequency, ReduceLROnPlateau's monitored metric), for optimisation a module does
  itself (grouped minibatches, MutualDistillation).
"""

from __future__ import annotations

import inspect

import pytorch_lightning as pl
import torch

from kd_lightning import KDConfigError
from kd_lightning.training.lightning_compat import fused_kernel_devices

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
