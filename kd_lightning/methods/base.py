"""The contract every distillation method implements: :class:`DistillationModule` and :class:`Losses`.

Data flows one way: a batch ``(x, y, index)`` -> ``compute_losses`` (student forward, frozen
teacher's outputs, loss terms from :mod:`kd_lightning.losses`) -> the base sums the named terms,
logs them and hands the sum to the optimizer. Label terms skip unlabelled rows (``y = -1``,
:func:`~kd_lightning.losses.labelled_cross_entropy`) and take MixUp/CutMix targets as they are
(:mod:`kd_lightning.losses.labels`; any other use of ``y`` goes through ``labels.mixed``).

**Hooks.** A method subclasses :class:`DistillationModule`, checks its hyperparameters in
``__init__`` (:mod:`kd_lightning.methods.checks`) and implements ``compute_losses(x, y, index)
-> Losses`` (required). Optional, where it needs them (the defaults do nothing):

- ``requires_teacher = True``: the method distils from a network teacher (refused without one);
  it reads it with ``teacher_logits``, ``teacher_forward`` and ``tap_teacher`` (frozen, no
  gradient, cached per example when the inputs are deterministic);
- ``mixing_refusal() -> str | None``: why the method cannot train on MixUp/CutMix batches;
- ``extra_callbacks() -> list[Callback]``: callbacks the method needs for every run;
- ``inspection_figures(batch) -> dict``: the method's own TensorBoard figures;
- ``log_window_closes() -> bool``: close the loss terms' logging window at this epoch's end;
- ``on_train_terms_logged()``: log more values (e.g. a schedule) next to the loss terms;
- ``learnable_parameters()``: what the optimizer trains (default: everything but the teacher);
- ``plateau_monitor``: the metric a ReduceLROnPlateau scheduler follows (``"val/loss"``);
- ``build_metrics(k)``, ``eval_step(batch, prefix)``: evaluate more than the student
  (:class:`~kd_lightning.methods.evaluation.Evaluation`, calling ``super()``);
- ``configure_optimizers()``: several optimizers, from ``build_optimizer`` and
  ``lr_scheduler_config``;
- any other Lightning hook (``setup``, ``on_train_start``, ...), calling ``super()``.

**The second form: methods that optimise themselves** (several optimizers stepped in an order:
``MutualDistillation``, ``DeepMutualLearning``) set ``optimizes_itself = True`` and implement
``minibatch_step(batch, batch_idx)`` instead of ``compute_losses``: they step each optimizer with
``optimizer_step_manually``, their schedulers with
:func:`~kd_lightning.training.optim.step_manual_lr_schedulers`, and record terms with ``log_terms``.

A method never overrides ``training_step`` or ``configure_callbacks`` (refused). The rest is
inherited from beside the contract: evaluation (:mod:`kd_lightning.methods.evaluation`), the
grouped fit (:mod:`kd_lightning.training.grouping`), optimizers and schedulers
(:mod:`kd_lightning.training.optim`), and the training-loop machinery, attached as callbacks so
that a method overriding a Lightning hook cannot switch it off.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.data.augment import check_mixing
from kd_lightning.losses.labels import labelled_mask, target_classes
from kd_lightning.methods.checks import check_base_arguments, check_data, check_mc_dropout
from kd_lightning.methods.evaluation import Evaluation, FitEndDistillationError
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.models.teacher import FrozenTeacher, record_validation_metrics
from kd_lightning.training import TermLog, optim, stage_callbacks
from kd_lightning.training.grouping import GroupedSteps, run_group
from kd_lightning.training.lightning_compat import FastHookBookkeeping, attached_trainer


class Losses(NamedTuple):
    """What a method's :meth:`~DistillationModule.compute_losses` returns.

    Attributes:
        logits: the student's logits for the batch (for the training accuracy).
        terms: the weighted loss terms, by name (``loss_ce``, ``loss_kd``, ...); the loss
            minimised is their sum, in this order.
        logged: further values logged by name but not added (unweighted parts, diagnostics).
    """

    logits: Tensor
    terms: dict[str, Tensor]
    logged: dict[str, Tensor] = {}


class DistillationModule(Evaluation, GroupedSteps, FastHookBookkeeping, pl.LightningModule):
    """Base LightningModule for knowledge distillation (the contract: see the module docstring).

    Args:
        student: the network being trained (any ``nn.Module`` mapping inputs to logits).
        teacher: the frozen network distilled from; required by methods with
            ``requires_teacher = True``.
        teacher_checkpoint: weights for ``teacher``: a checkpoint written by ``kd-lightning fit``
            of :class:`~kd_lightning.methods.Supervised`, or a plain ``state_dict``. Loaded with
            ``weights_only=True``.
        num_classes: number of classes (linked from the data module by the CLI).
        optimizer: optimizer factory called with the learnable parameters (student + method
            extras, never the teacher).
        lr_scheduler: optional scheduler factory called with the optimizer.
        lr_scheduler_interval: ``"epoch"`` or ``"step"``.
        teacher_cache: cache the teacher's outputs per training example (keyed by the batch's
            ``index``). ``None`` (default) turns it on when the training inputs are deterministic
            (no augmentation) and off otherwise; ``False`` forces it off. Logits are always
            cached when it is on; tapped teacher features too when they fit in
            ``teacher_cache_mb``.
        teacher_cache_mb: memory budget (MiB, on the training device) for cached features and logits.
        fused_optimizer: use the optimizer's fused kernel when it has one and neither ``fused``
            nor ``foreach`` was set (see :func:`~kd_lightning.training.use_fused_kernel`; off by
            default because it rounds differently from the plain update).
        log_step_terms: also log every loss term at every ``log_every_n_steps`` (costs time per
            step; window means are always logged, see :mod:`kd_lightning.training.term_log`).
        distill_error_temperature: temperature gamma of the distillation error
            (:class:`~kd_lightning.metrics.DistillationError`) logged with the teacher agreement
            as ``val/`` and ``test/distill_error``, ``.../teacher_agreement`` when there is a
            teacher, and at the end of a fit over the labelled training examples as
            ``train/distill_error`` (default 1).
        mc_dropout_samples: ``T > 0`` reports the predictive uncertainty at test time: ECE, NLL
            and predictive entropy of the deterministic prediction and accuracy, ECE, NLL and
            entropy of the mean of ``T`` MC-dropout passes, for the student (``test/mc_ece``, ...)
            and the teacher (``test/teacher_mc_ece``, ...; deterministic only if it has no
            dropout), see :class:`~kd_lightning.metrics.TestUncertainty`. The student must have
            dropout layers. 0 (default): off.
    """

    #: methods that distil from a network teacher set this to True
    requires_teacher: bool = False
    #: methods that run their own optimizer steps (in :meth:`minibatch_step`) set this to True
    optimizes_itself: bool = False
    #: the metric a ReduceLROnPlateau scheduler follows
    plateau_monitor: str = "val/loss"

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name, instead in (("training_step", "compute_losses (or, with optimizes_itself = True, "
                                                "minibatch_step)"),
                              ("configure_callbacks", "extra_callbacks")):
            if name in cls.__dict__:
                raise TypeError(f"{cls.__name__} overrides DistillationModule.{name}, which the base "
                                f"class owns; implement {instead} instead.")

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 teacher_checkpoint: str | None = None, num_classes: int | None = None,
                 optimizer: OptimizerCallable = torch.optim.Adam,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 lr_scheduler_interval: str = "epoch", teacher_cache: bool | None = None,
                 teacher_cache_mb: float = 512.0, fused_optimizer: bool = False,
                 log_step_terms: bool = False, distill_error_temperature: float = 1.0,
                 mc_dropout_samples: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "optimizer", "lr_scheduler"])
        check_base_arguments(type(self), teacher, teacher_checkpoint, lr_scheduler_interval,
                             distill_error_temperature)
        check_mc_dropout(mc_dropout_samples, student, teacher)
        self.distill_error_temperature = distill_error_temperature
        self.mc_dropout_samples = mc_dropout_samples
        self.automatic_optimization = not self.optimizes_itself
        self.student = student
        self.teacher = teacher
        self.frozen_teacher = FrozenTeacher(teacher, teacher_checkpoint) if teacher is not None else None
        self.num_classes = num_classes
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.teacher_cache, self.teacher_cache_mb = teacher_cache, teacher_cache_mb
        self.fused_optimizer, self.log_step_terms = fused_optimizer, log_step_terms
        self.term_log = TermLog()
        #: whether the last fit read the teacher's outputs from the per-example cache
        self.teacher_cache_used: bool | None = None
        if num_classes is not None:
            self.build_metrics(num_classes)

    # ---- the training step: one template for every method -------------------------------------
    def compute_losses(self, x: Tensor, y: Tensor, index: Tensor) -> Losses:
        """The method: student logits and the named, weighted loss terms for one minibatch."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses(x, y, index).")

    @staticmethod
    def labelled_rows(y: Tensor) -> Tensor:
        """``[B]`` mask of the labelled rows (the others, ``y == UNLABELLED``, are for distillation only)."""
        return labelled_mask(y)

    def mixing_refusal(self) -> str | None:
        """Why this method cannot train on MixUp/CutMix batches (checked when a fit starts); ``None``: it can."""
        return None

    def minibatch_step(self, batch, batch_idx: int) -> Tensor:
        """One minibatch: the method's terms, summed and logged; returns the loss to minimise.
        (A method with ``optimizes_itself = True`` overrides this and runs its own steps.)"""
        x, y, index = batch
        logits, terms, logged = self.compute_losses(x, y, index)
        loss = functools.reduce(operator.add, terms.values())
        self.log_terms(logits, y, loss=loss, **terms, **logged)
        return loss

    def optimizer_step_manually(self, optimizer, loss: Tensor, counted: bool = True) -> None:
        """Backward ``loss``, step ``optimizer`` (:func:`~kd_lightning.training.optim.manual_optimizer_step`)."""
        optim.manual_optimizer_step(self, optimizer, loss, counted)

    def training_step(self, batch, batch_idx: int):
        """One Lightning step: one minibatch, or ``data.batches_per_step`` of them."""
        if self.grouped_fit is None:
            return self.minibatch_step(batch, batch_idx)
        return run_group(self, batch, batch_idx, self.minibatch_step)

    def configure_callbacks(self):
        # each fit starts in the optimisation mode the method declares (kept after it: global_step counts its steps)
        if self.trainer.state.fn == TrainerFn.FITTING:
            self.grouped_fit = None
            check_mixing(self, self.trainer.datamodule)
        return stage_callbacks(self.trainer, [FitEndDistillationError(), *self.extra_callbacks()])

    def extra_callbacks(self) -> list[pl.Callback]:
        """Callbacks a method needs for every run (none by default)."""
        return []

    def inspection_figures(self, batch) -> dict:
        """The method's figures (matplotlib ``Figure`` by name, logged as ``inspect/<name>``) for
        a few fixed validation examples ``(x, y, index)``, drawn without gradient in eval mode by
        :class:`~kd_lightning.training.figures.InspectionFigures`. None by default."""
        return {}

    def log_terms(self, logits: Tensor | None = None, targets: Tensor | None = None, **terms: Tensor) -> None:
        """Record loss terms and the training accuracy for the per-window log (``training.term_log``)."""
        self.term_log.record(logits, None if targets is None else target_classes(targets), terms)
        if self.log_step_terms:
            self.log_dict({f"train_step/{k}": v.detach() for k, v in terms.items()},
                          on_step=True, on_epoch=False)

    def log_window_closes(self) -> bool:
        """True at an epoch whose end must log the term means with the window not full (a stage's end)."""
        return False

    def on_train_terms_logged(self) -> None:
        """Hook: called right after the running means of the loss terms were logged."""

    # ---- teacher ---------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Lightning calls ``train()`` on the whole module; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def tap_teacher(self, layers: list[str], pre_activation: bool | list[bool] = False) -> FeatureTaps:
        """Record teacher features at ``layers`` (module paths) for :meth:`teacher_forward`.
        Call once in a method's ``__init__``."""
        if self.frozen_teacher is None:
            raise KDConfigError("tap_teacher() needs a teacher network.")
        return self.frozen_teacher.tap(layers, pre_activation)

    def teacher_forward(self, x: Tensor, index: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits and tapped features (no gradient): from the per-example cache while
        training on deterministic inputs, else a forward of the frozen teacher."""
        return self.frozen_teacher.outputs(x, index, from_cache=self.training)

    def teacher_logits(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Teacher logits for a batch (no gradient), from the cache when it is active."""
        return self.frozen_teacher.logits(x, index, from_cache=self.training)

    def on_train_start(self) -> None:
        if self.frozen_teacher is not None:
            self.teacher_cache_used = self.frozen_teacher.prepare_cache(
                self.trainer, self.teacher_cache, self.teacher_cache_mb)

    def on_train_end(self) -> None:
        if self.frozen_teacher is not None:
            self.frozen_teacher.clear_caches()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        record_validation_metrics(self.trainer, checkpoint)  # read when it is loaded as a teacher

    # ---- learnable parameters and optimisation -------------------------------------------
    def learnable_parameters(self) -> Iterator[nn.Parameter]:
        """Student + method-owned modules; never the teacher."""
        for name, p in self.named_parameters():
            if not name.startswith("teacher.") and p.requires_grad:
                yield p

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The configured optimizer over ``params`` (its fused kernel with ``fused_optimizer``)."""
        return optim.configured_optimizer(self, params)

    def lr_scheduler_config(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """Lightning's scheduler config for the configured LR scheduler (``None`` without one)."""
        return optim.configured_lr_scheduler(self, optimizer)

    def configure_optimizers(self):
        optimizer = self.build_optimizer(list(self.learnable_parameters()))
        config = self.lr_scheduler_config(optimizer)
        return optimizer if config is None else {"optimizer": optimizer, "lr_scheduler": config}

    # ---- checks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.num_classes is None and getattr(dm, "num_classes", None) is not None:
            self.num_classes = dm.num_classes
        self.ensure_metrics()
        check_data(self, dm)

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    @property
    def trainer_or_none(self) -> pl.Trainer | None:
        """The attached trainer, or ``None`` outside a fit."""
        return attached_trainer(self)
