"""Training machinery the methods share: grouped minibatches, per-window term logging,
optimizer/scheduler helpers, LR schedules, epoch counts, and the one module that touches
Lightning internals."""

import weakref

from kd_lightning.training.epochs import minibatches_per_epoch, resolve_epochs
from kd_lightning.training.grouping import GroupedOptimization, run_group
from kd_lightning.training.lightning_compat import ScopedFitEnvironment
from kd_lightning.training.preemption import Preemption
from kd_lightning.training.publish import PublishBest
from kd_lightning.training.random_states import RandomStates
from kd_lightning.training.optim import lr_scheduler_config, step_lr_schedulers, use_fused_kernel
from kd_lightning.training.schedulers import LinearWarmupCosineAnnealingLR
from kd_lightning.training.term_log import TermLog, TermLogging, TrainingDiverged



def standard_callbacks() -> list:
    """The callbacks every :class:`~kd_lightning.methods.DistillationModule` attaches to every
    run (a method adds its own with ``extra_callbacks``)."""
    return [ScopedFitEnvironment(), GroupedOptimization(), TermLogging(), RandomStates(), Preemption()]


#: the callbacks :func:`stage_callbacks` handed to a trainer
_STAGE_CALLBACKS: weakref.WeakSet = weakref.WeakSet()


def stage_callbacks(trainer, extra: list) -> list:
    """A module's callbacks for one stage (``configure_callbacks``): fresh
    :func:`standard_callbacks` and ``extra``. Those it handed over for an earlier stage of the
    same trainer (``fit`` testing the best checkpoint after training) leave the trainer first,
    instead of Lightning replacing them with a notice that names each one."""
    trainer.callbacks = [c for c in trainer.callbacks if c not in _STAGE_CALLBACKS]
    callbacks = [*standard_callbacks(), *extra]
    _STAGE_CALLBACKS.update(callbacks)
    return callbacks


__all__ = ["GroupedOptimization", "LinearWarmupCosineAnnealingLR", "Preemption", "PublishBest", "RandomStates", "ScopedFitEnvironment", "TermLog",
           "TermLogging", "TrainingDiverged", "lr_scheduler_config", "minibatches_per_epoch",
           "resolve_epochs", "run_group", "stage_callbacks", "standard_callbacks", "step_lr_schedulers", "use_fused_kernel"]
