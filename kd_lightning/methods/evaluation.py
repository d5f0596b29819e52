"""Validation, test and prediction of a :class:`~kd_lightning.methods.DistillationModule`.

:class:`Evaluation` is a base class of the distillation base class (as
:class:`~kd_lightning.training.grouping.GroupedSteps` is for the grouped fit): a method inherits
it and only extends it when it evaluates more (:class:`~kd_lightning.methods.MutualDistillation`
its rules, :class:`~kd_lightning.methods.DeepMutualLearning` every peer), through
:meth:`Evaluation.build_metrics` and :meth:`Evaluation.eval_step`.

Logged at every validation epoch: ``val/loss``, ``val/acc`` (also as ``hp_metric``),
``val/acc_top5`` (more than 5 classes) and, with a teacher, ``val/distill_error`` and
``val/teacher_agreement``; at the end of a fit, with a teacher, ``train/distill_error``: the
distillation error over the labelled training examples the student was trained on, in one pass
without augmentation (:class:`FitEndDistillationError`; the lecture notes state their bound for
it on these examples); at test: the same as validation under ``test/`` plus ``test/errors``
(misclassified examples), ``test/teacher_acc`` and ``test/teacher_errors``, and with
``mc_dropout_samples > 0`` the predictive uncertainty of
:class:`~kd_lightning.metrics.TestUncertainty`.
"""

from __future__ import annotations

import itertools
import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor
from torchmetrics import MeanMetric, SumMetric
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning import KDConfigError
from kd_lightning.metrics import DistillationError, TestUncertainty, dropout_modules


class Evaluation:
    """Evaluation metrics and the validation/test/predict steps (a base class placed before
    ``pl.LightningModule``). Uses the module's ``student``, ``teacher``, ``teacher_logits``,
    ``distill_error_temperature`` and ``mc_dropout_samples``."""

    #: whether :meth:`build_metrics` ran (at ``__init__`` with ``num_classes``, else at ``setup``)
    metrics_built: bool = False

    def build_metrics(self, k: int) -> None:
        """Create the metrics for ``k`` classes. A method that logs more extends this (calling
        ``super().build_metrics(k)``)."""
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
            for prefix in ("train", "val", "test"):
                setattr(self, f"{prefix}_distill_error", DistillationError(self.distill_error_temperature))
                setattr(self, f"{prefix}_teacher_agreement", MulticlassAccuracy(num_classes=k, average="micro"))
        self.test_uncertainty = None
        if self.mc_dropout_samples:
            networks = {"": True, **({"teacher_": bool(dropout_modules(self.teacher))}
                                     if self.teacher is not None else {})}
            self.test_uncertainty = TestUncertainty(k, self.mc_dropout_samples, networks)
        self.metrics_built = True

    def ensure_metrics(self) -> None:
        """Build the metrics (at ``setup``) if ``__init__`` could not: ``num_classes`` is known now."""
        if not self.metrics_built:
            if self.num_classes is None:
                raise KDConfigError("num_classes is unknown: set model.init_args.num_classes.")
            self.build_metrics(self.num_classes)

    def eval_step(self, batch, prefix: str) -> Tensor:
        """Update the ``prefix`` ("val" or "test") metrics with one batch; returns the student's
        logits (for a method that evaluates more)."""
        x, y, index = batch
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
        if self.teacher is not None:  # the frozen teacher's eval-mode logits
            t_logits = self.eval_teacher_logits(x, index, prefix)
            getattr(self, f"{prefix}_distill_error").update(logits, t_logits, y)
            getattr(self, f"{prefix}_teacher_agreement").update(logits, t_logits.argmax(-1))
            if prefix == "test":
                self.test_teacher_acc.update(t_logits, y)
                self.test_teacher_errors.update((t_logits.argmax(-1) != y).sum())
            outputs["teacher_"] = (self.teacher, t_logits)
        if prefix == "test" and self.test_uncertainty is not None:
            self.test_uncertainty.update(x, y, outputs)
        return logits

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.teacher is not None:  # a new fit may validate on other data
            self.frozen_teacher.val_cache.clear()

    def eval_teacher_logits(self, x: Tensor, index: Tensor, prefix: str) -> Tensor:
        """The frozen teacher's eval-mode logits of an evaluation batch (never the training
        cache). A fit's validation batches are computed once and kept
        (:meth:`~kd_lightning.models.teacher.FrozenTeacher.validation_logits`, within
        ``teacher_cache_mb``) when the data module says its validation inputs never change
        (``deterministic_eval``) and there is one validation loader; test, ``validate`` and
        other data run the teacher."""
        trainer = self.trainer_or_none
        if (prefix == "val" and trainer is not None and trainer.state.fn == TrainerFn.FITTING
                and getattr(trainer.datamodule, "deterministic_eval", False)
                and len(trainer.num_val_batches) == 1):
            return self.frozen_teacher.validation_logits(x, index, self.teacher_cache_mb)
        return self.teacher_logits(x)

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

    @torch.no_grad()
    def training_distill_error(self, loader) -> Tensor:
        r"""The distillation error :math:`\Phi_{\gamma,n}` of the student against the teacher
        over the batches ``(x, y, index)`` of ``loader`` (every DDP rank passes its shard; the
        metric sums across ranks), both networks in eval mode; the teacher's logits come from the
        per-example cache while it holds them. Every module's mode is restored afterwards."""
        metric = self.train_distill_error
        metric.reset()
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            with self.trainer.precision_plugin.forward_context():
                for batch in loader:
                    x, y, index = self.transfer_batch_to_device(batch, self.device, 0)
                    metric.update(self.student(x), self.frozen_teacher.logits(x, index), y)
        finally:
            for m, mode in modes.items():
                m.training = mode
        value = metric.compute()
        metric.reset()
        return value

    def validation_step(self, batch, batch_idx: int) -> None:
        self.eval_step(batch, "val")

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
        self.eval_step(batch, "test")

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


class FitEndDistillationError(pl.Callback):
    r"""At the end of a fit with a teacher, ``train/distill_error``: the distillation error
    :math:`\Phi_{\gamma,n}` (:class:`~kd_lightning.metrics.DistillationError`) over the ``n``
    labelled training examples -- the few-data subset, or the whole training split -- in one
    pass without augmentation (the data module's ``labelled_train_dataloader``), the data the
    lecture notes' bound is stated for. A trainer that limits its training batches
    (``limit_train_batches``, ``fast_dev_run``) limits this pass the same way, as Lightning's own
    loops are limited, so a debugging run stays short. Logged to every logger at the last global
    step and put in ``trainer.callback_metrics`` (Lightning allows no ``self.log`` at the end of a
    fit). Skipped without a teacher or with a data module that has no such loader (or returns
    ``None``)."""

    KEY = "train/distill_error"

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        make_loader = getattr(trainer.datamodule, "labelled_train_dataloader", None)
        if getattr(pl_module, "frozen_teacher", None) is None or make_loader is None \
                or not hasattr(pl_module, "train_distill_error") or trainer.interrupted:
            return
        loader = make_loader()
        if loader is None:
            return
        limit = trainer.limit_train_batches  # a count of batches, or a fraction of them (1.0: all)
        if isinstance(limit, int) or limit < 1.0:
            count = limit if isinstance(limit, int) else math.ceil(limit * len(loader))
            if count <= 0:
                return
            loader = itertools.islice(loader, count)
        value = pl_module.training_distill_error(loader)
        trainer.callback_metrics[self.KEY] = value
        for logger in trainer.loggers:
            logger.log_metrics({self.KEY: float(value)}, step=trainer.global_step)
