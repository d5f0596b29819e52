"""The base class every distillation method builds on.

Data flows one way: a batch ``(x, y, index)`` -> :meth:`DistillationModule.compute_losses` (the
method: student forward, frozen teacher's outputs, loss terms from :mod:`kd_lightning.losses`) ->
the base sums the named terms, logs them and hands the sum to the optimizer. An unlabelled
training example (``data.unlabelled``) has ``y = UNLABELLED`` (-1): a method's label terms skip it
(:meth:`DistillationModule.labelled_rows`, :func:`~kd_lightning.losses.labelled_cross_entropy`),
its distillation terms use it. Under MixUp/CutMix (``data.mixup`` / ``data.cutmix``) ``y`` is a
:class:`~kd_lightning.losses.labels.MixedTargets`: the label losses of
:mod:`kd_lightning.losses.labels` take it as it is (``lam L(y_a) + (1 - lam) L(y_b)``), any other
use of the labels goes through :func:`~kd_lightning.losses.labels.mixed`, and a method that cannot
use mixed targets says why in :meth:`DistillationModule.mixing_refusal`.

A method is a subclass that holds its hyperparameters and implements ``compute_losses``; the base
owns the rest once: the frozen teacher (:class:`~kd_lightning.models.teacher.FrozenTeacher`), which
parameters are learnable, optimizer/scheduler injection, metrics and evaluation. The training loop
machinery lives in :mod:`kd_lightning.training` and is attached as callbacks, so a method that
overrides a Lightning hook cannot switch it off.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from typing import NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning import KDConfigError
from kd_lightning.data.augment import check_mixing
from kd_lightning.losses.labels import labelled_mask, target_classes
from kd_lightning.metrics import DistillationError, TestUncertainty, dropout_modules
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.models.teacher import FrozenTeacher
from kd_lightning.methods.checks import check_class_counts
from kd_lightning.training import (GroupedOptimization, Preemption, RandomStates, ScopedFitEnvironment, TermLog, TermLogging,
                                   lr_scheduler_config, run_group, use_fused_kernel)
from kd_lightning.training.optim import build_lr_scheduler
from kd_lightning.training.grouping import GroupedFit, move_batch
from kd_lightning.training.lightning_compat import HOOK_BOOKKEEPING_ATTRIBUTES, attached_trainer


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


def check_weights(method: str, **weights: float) -> None:
    """Every loss weight must be a number >= 0."""
    for name, value in weights.items():
        if not value >= 0:
            raise KDConfigError(f"{method}: {name} must be >= 0, got {value}.")


def check_temperature(method: str, temperature: float) -> None:
    if not temperature > 0:
        raise KDConfigError(f"{method}: temperature must be > 0, got {temperature}; Hinton et al. "
                            f"use 1-20 (default 4).")


def check_mc_dropout(samples: int, student: nn.Module, teacher: nn.Module | None) -> None:
    """``mc_dropout_samples`` must be an int >= 0, and > 0 only with a student that has dropout."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise KDConfigError(f"mc_dropout_samples must be an integer >= 0 (0 = off), got {samples!r}.")
    if samples == 0:
        return
    if not dropout_modules(student):
        raise KDConfigError(
            f"mc_dropout_samples={samples} asks for MC-dropout predictions, but the student "
            f"({type(student).__name__}) has no dropout layer (nn.Dropout* with p > 0); give it "
            f"dropout (e.g. kd_lightning.models.MLP with dropout: 0.2) or set mc_dropout_samples: 0.")
    if teacher is not None and not dropout_modules(teacher):
        rank_zero_warn(f"mc_dropout_samples: the teacher ({type(teacher).__name__}) has no dropout "
                       f"layer, so only its deterministic calibration is reported.")


class DistillationModule(pl.LightningModule):
    """Base LightningModule for knowledge distillation.

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
        teacher_cache_mb: memory budget (MiB, on the training device) for cached features.
        fused_optimizer: use the optimizer's fused kernel when it has one and neither ``fused``
            nor ``foreach`` was set (see :func:`~kd_lightning.training.use_fused_kernel`; off by
            default because it rounds differently from the plain update).
        log_step_terms: also log every loss term at every ``log_every_n_steps`` (costs time per
            step; window means are always logged, see :mod:`kd_lightning.training.term_log`).
        distill_error_temperature: temperature gamma of the distillation error
            (:class:`~kd_lightning.metrics.DistillationError`) logged with the teacher agreement
            as ``val/`` and ``test/distill_error``, ``.../teacher_agreement`` when there is a
            teacher (default 1).
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
        if self.requires_teacher and teacher is None:
            raise KDConfigError(
                f"{type(self).__name__} distils from a teacher network, but no teacher was given. "
                f"Set model.init_args.teacher (class_path + init_args) and "
                f"model.init_args.teacher_checkpoint (a checkpoint of `kd-lightning fit` with "
                f"kd_lightning.methods.Supervised).")
        if teacher is None and teacher_checkpoint is not None:
            raise KDConfigError("teacher_checkpoint is set but teacher is not: give the teacher "
                                "architecture as model.init_args.teacher.")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise KDConfigError(
                f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}.")
        if not distill_error_temperature > 0:
            raise KDConfigError(f"distill_error_temperature must be > 0, got {distill_error_temperature}.")
        check_mc_dropout(mc_dropout_samples, student, teacher)
        self.distill_error_temperature = distill_error_temperature
        self.mc_dropout_samples = mc_dropout_samples
        self.automatic_optimization = not self.optimizes_itself
        self.student = student
        self.teacher = teacher
        self.frozen_teacher = FrozenTeacher(teacher, teacher_checkpoint) if teacher is not None else None
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.teacher_cache = teacher_cache
        self.teacher_cache_mb = teacher_cache_mb
        self.fused_optimizer = fused_optimizer
        self.log_step_terms = log_step_terms
        self.term_log = TermLog()
        #: whether the last fit read the teacher's outputs from the per-example cache
        self.teacher_cache_used: bool | None = None
        #: set by GroupedOptimization for a fit with data.batches_per_step > 1
        self.grouped_fit: GroupedFit | None = None
        self._metrics_built = False
        if num_classes is not None:
            self._build_metrics(num_classes)

    def __setattr__(self, name: str, value) -> None:
        if name in HOOK_BOOKKEEPING_ATTRIBUTES:  # a plain string Lightning sets per hook call
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    # ---- the training step: one template for every method -------------------------------------
    def compute_losses(self, x: Tensor, y: Tensor, index: Tensor) -> Losses:
        """The method: student logits and the named, weighted loss terms for one minibatch."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses(x, y, index).")

    @staticmethod
    def labelled_rows(y: Tensor) -> Tensor:
        """``[B]`` bool mask of the rows of a training batch that carry a label; the others are
        unlabelled transfer examples (``y == UNLABELLED``), for distillation terms only."""
        return labelled_mask(y)

    def mixing_refusal(self) -> str | None:
        """Why this method (as configured) cannot train on MixUp/CutMix batches, or ``None``
        when it can (the default: its label terms take
        :class:`~kd_lightning.losses.labels.MixedTargets`). Checked when a fit starts."""
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
        """For methods that optimise themselves: backward ``loss`` and step ``optimizer`` (a
        LightningOptimizer). A ``counted`` step is a training step (``global_step``); the others
        (auxiliary optimizers, further peers) take the same strategy/precision path uncounted."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if counted:
            optimizer.step()
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=_no_closure)

    def training_step(self, batch, batch_idx: int):
        """One Lightning step: one minibatch, or ``data.batches_per_step`` of them."""
        if self.grouped_fit is None:
            return self.minibatch_step(batch, batch_idx)
        return run_group(self, batch, batch_idx, self.minibatch_step)

    @property
    def declared_automatic_optimization(self) -> bool:
        return self._automatic_optimization

    @property
    def automatic_optimization(self) -> bool:
        """Lightning optimises (``True``) unless the method optimises itself or this fit trains
        several minibatches per step (then :func:`~kd_lightning.training.run_group` does)."""
        return self._automatic_optimization and self.grouped_fit is None

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self._automatic_optimization = value

    def configure_callbacks(self):
        # called at the start of every fit/validate/test/predict, before Lightning checks the
        # optimisation mode: each fit starts in the mode the method declares (after a fit the
        # mode stays, so that trainer.global_step keeps counting that fit's optimizer steps)
        if self.trainer.state.fn == TrainerFn.FITTING:
            self.grouped_fit = None
            check_mixing(self, self.trainer.datamodule)
        return [ScopedFitEnvironment(), GroupedOptimization(), TermLogging(), RandomStates(),
                Preemption(), *self.extra_callbacks()]

    def extra_callbacks(self) -> list[pl.Callback]:
        """Callbacks a method needs for every run (none by default)."""
        return []

    def inspection_figures(self, batch) -> dict:
        """Hook: the method's own TensorBoard figures (matplotlib ``Figure`` by name, logged as
        ``inspect/<name>``) for a few fixed validation examples ``(x, y, index)``; called without
        gradient, in eval mode, by :class:`~kd_lightning.training.figures.InspectionFigures` at
        the validation epochs that draw. None by default."""
        return {}

    def log_terms(self, logits: Tensor | None = None, targets: Tensor | None = None,
                  **terms: Tensor) -> None:
        """Record loss terms (and the training accuracy) for the per-window log
        (:mod:`kd_lightning.training.term_log`)."""
        self.term_log.record(logits, None if targets is None else target_classes(targets), terms)
        if self.log_step_terms:
            self.log_dict({f"train_step/{k}": v.detach() for k, v in terms.items()},
                          on_step=True, on_epoch=False)

    def log_window_closes(self) -> bool:
        """True at an epoch whose end must log the running term means even if the logging window
        is not full (e.g. a stage boundary)."""
        return False

    def on_train_terms_logged(self) -> None:
        """Hook: called right after the running means of the loss terms were logged."""

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        moved = move_batch(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx) if moved is None else moved

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
            self.frozen_teacher.cache.clear()

    # ---- learnable parameters and optimisation -------------------------------------------
    def learnable_parameters(self) -> Iterator[nn.Parameter]:
        """Student + method-owned modules; never the teacher."""
        for name, p in self.named_parameters():
            if not name.startswith("teacher.") and p.requires_grad:
                yield p

    def build_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The configured optimizer over ``params`` (its fused kernel with ``fused_optimizer``)."""
        optimizer = self.optimizer_factory(params)
        return use_fused_kernel(optimizer) if self.fused_optimizer else optimizer

    def lr_scheduler_config(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """Lightning's scheduler config for the configured LR scheduler (``None`` without one)."""
        if self.lr_scheduler_factory is None:
            return None
        monitor = self.plateau_monitor if self.automatic_optimization else None
        interval = self.hparams.lr_scheduler_interval
        scheduler = build_lr_scheduler(self.lr_scheduler_factory, optimizer, self.trainer_or_none, interval)
        return lr_scheduler_config(scheduler, interval, monitor)

    def configure_optimizers(self):
        optimizer = self.build_optimizer(list(self.learnable_parameters()))
        config = self.lr_scheduler_config(optimizer)
        return optimizer if config is None else {"optimizer": optimizer, "lr_scheduler": config}

    # ---- checks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        k_data = getattr(dm, "num_classes", None)
        if self.num_classes is None and k_data is not None:
            self.num_classes = k_data
        if not self._metrics_built:
            if self.num_classes is None:
                raise KDConfigError("num_classes is unknown: set model.init_args.num_classes.")
            self._build_metrics(self.num_classes)
        shape = getattr(dm, "input_shape", None)
        if shape is not None:
            check_class_counts(self.student, self.teacher, shape, k_data, self.num_classes, self.device)
            if self.frozen_teacher is not None and self.frozen_teacher.taps is not None:
                self.frozen_teacher.taps.pop()  # the probe's features are not a training batch's

    # ---- metrics and evaluation -----------------------------------------------------------
    def _build_metrics(self, k: int) -> None:
        self.val_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.test_teacher_acc = MulticlassAccuracy(num_classes=k, average="micro")
        # misclassified test examples, as MNIST papers count them (summed over DDP ranks)
        self.test_errors = SumMetric()
        self.test_teacher_errors = SumMetric()
        self.top5 = k > 5
        if self.top5:
            self.val_acc5 = MulticlassAccuracy(num_classes=k, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes=k, top_k=5, average="micro")
        if self.teacher is not None:
            for prefix in ("val", "test"):
                setattr(self, f"{prefix}_distill_error", DistillationError(self.distill_error_temperature))
                setattr(self, f"{prefix}_teacher_agreement", MulticlassAccuracy(num_classes=k, average="micro"))
        self.test_uncertainty = None
        if self.mc_dropout_samples:
            networks = {"": True, **({"teacher_": bool(dropout_modules(self.teacher))}
                                     if self.teacher is not None else {})}
            self.test_uncertainty = TestUncertainty(k, self.mc_dropout_samples, networks)
        self._metrics_built = True

    def _eval_step(self, batch, prefix: str) -> Tensor:
        x, y, _ = batch
        logits = self.student(x)
        loss = F.cross_entropy(logits.float(), y)
        # the per-example mean over every rank (a metric object: DDP ranks may hold unequal
        # numbers of examples, which Lightning's epoch mean of logged tensors rounds on gloo)
        mean_loss = getattr(self, f"{prefix}_loss")
        mean_loss.update(loss, weight=y.numel())
        self.log(f"{prefix}/loss", mean_loss, on_step=False, on_epoch=True)
        getattr(self, f"{prefix}_acc").update(logits, y)
        if prefix == "test":
            self.test_errors.update((logits.argmax(-1) != y).sum())
        if self.top5:
            getattr(self, f"{prefix}_acc5").update(logits, y)
        outputs = {"": (self.student, logits)}
        if self.teacher is not None:  # the frozen teacher's eval-mode logits (never the cache)
            t_logits = self.teacher_logits(x)
            getattr(self, f"{prefix}_distill_error").update(logits, t_logits, y)
            getattr(self, f"{prefix}_teacher_agreement").update(logits, t_logits.argmax(-1))
            if prefix == "test":
                self.test_teacher_acc.update(t_logits, y)
                self.test_teacher_errors.update((t_logits.argmax(-1) != y).sum())
            outputs["teacher_"] = (self.teacher, t_logits)
        if prefix == "test" and self.test_uncertainty is not None:
            self.test_uncertainty.update(x, y, outputs)
        return logits

    def _teacher_metrics(self, prefix: str) -> dict[str, Tensor]:
        """The epoch's distillation error and teacher agreement (reset); {} without a teacher."""
        if self.teacher is None:
            return {}
        metrics = {}
        for name in ("distill_error", "teacher_agreement"):
            metric = getattr(self, f"{prefix}_{name}")
            metrics[f"{prefix}/{name}"] = metric.compute()
            metric.reset()
        return metrics

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc.reset()
        metrics = {"val/acc": acc, "hp_metric": acc}
        if self.top5:
            metrics["val/acc_top5"] = self.val_acc5.compute()
            self.val_acc5.reset()
        metrics.update(self._teacher_metrics("val"))
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        metrics = {"test/acc": self.test_acc.compute(), "test/errors": self.test_errors.compute()}
        self.test_acc.reset()
        self.test_errors.reset()
        if self.top5:
            metrics["test/acc_top5"] = self.test_acc5.compute()
            self.test_acc5.reset()
        if self.teacher is not None:
            metrics["test/teacher_acc"] = self.test_teacher_acc.compute()
            metrics["test/teacher_errors"] = self.test_teacher_errors.compute()
            self.test_teacher_acc.reset()
            self.test_teacher_errors.reset()
        metrics.update(self._teacher_metrics("test"))
        if self.test_uncertainty is not None:
            metrics.update({f"test/{k}": v for k, v in self.test_uncertainty.compute().items()})
            self.test_uncertainty.reset()
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def predict_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        x, _, idx = batch
        logits = self.student(x)
        return {"index": idx, "logits": logits, "pred": logits.argmax(-1)}

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    @property
    def trainer_or_none(self) -> pl.Trainer | None:
        """The attached trainer, or ``None`` outside a fit."""
        return attached_trainer(self)


def _no_closure() -> None:
    """The closure of an uncounted manual step: the gradients are already there."""
    return None
