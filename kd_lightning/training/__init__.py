"""Training machinery the methods share: grouped minibatches, per-window term logging,
optimizer/scheduler helpers, LR schedules, epoch counts, and the one module that touches
Lightning internals."""

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


__all__ = ["GroupedOptimization", "LinearWarmupCosineAnnealingLR", "Preemption", "PublishBest", "RandomStates", "ScopedFitEnvironment", "TermLog",
           "TermLogging", "TrainingDiverged", "lr_scheduler_config", "minibatches_per_epoch",
           "resolve_epochs", "run_group", "standard_callbacks", "step_lr_schedulers", "use_fused_kernel"]
