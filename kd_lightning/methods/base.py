"""The small base class every distillation method builds on.

It owns, once for all methods: the frozen teacher (loading, freezing, eval mode, no gradient,
never optimised), the per-example teacher-output cache, which parameters are learnable,
optimizer/scheduler injection, metrics (torchmetrics, DDP-synced), and cheap per-epoch logging
of every loss term by name. A method subclass holds its hyperparameters and a
``training_step`` that composes loss terms from :mod:`kd_lightning.losses`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning import KDConfigError
from kd_lightning.models.weights import load_teacher_weights

# the frozen teacher is deliberately in eval mode while the student trains
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


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
            (no augmentation) and off otherwise; ``False`` forces it off.
        log_step_terms: also log every loss term at every ``log_every_n_steps`` (costs time per
            step; epoch means are always logged).
    """

    #: methods that distil from a network teacher set this to True
    requires_teacher: bool = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 teacher_checkpoint: str | None = None, num_classes: int | None = None,
                 optimizer: OptimizerCallable = torch.optim.Adam,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 lr_scheduler_interval: str = "epoch", teacher_cache: bool | None = None,
                 log_step_terms: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "optimizer", "lr_scheduler"])
        if self.requires_teacher and teacher is None:
            raise KDConfigError(
                f"{type(self).__name__} distils from a teacher network, but no teacher was given. "
                f"Set model.init_args.teacher (class_path + init_args) and "
                f"model.init_args.teacher_checkpoint (a checkpoint of `kd-lightning fit` with "
                f"kd_lightning.methods.Supervised).")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise KDConfigError(
                f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}.")
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            if teacher_checkpoint is not None:
                load_teacher_weights(teacher, teacher_checkpoint)
            teacher.requires_grad_(False)
            teacher.eval()
        elif teacher_checkpoint is not None:
            raise KDConfigError("teacher_checkpoint is set but teacher is not: give the teacher "
                                "architecture as model.init_args.teacher.")
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.teacher_cache = teacher_cache
        self.log_step_terms = log_step_terms
        self._cache: Tensor | None = None  # [num_source_examples, K] teacher logits
        self._cache_used: bool | None = None  # set at the start of training
        self._term_sums: dict[str, Tensor] = {}
        self._term_steps = 0
        self._train_correct: Tensor | None = None
        self._train_seen = 0
        self._metrics_built = False
        if num_classes is not None:
            self._build_metrics(num_classes)

    # ---- teacher ---------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Lightning calls ``train()`` on the whole module; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Teacher logits for a batch: from the cache when it is active, else a no-grad forward."""
        if self._cache is not None and index is not None and self.training:
            return self._cache[index]
        return self.teacher(x)

    def _resolve_cache(self) -> bool:
        dm = getattr(self.trainer, "datamodule", None)
        deterministic = bool(getattr(dm, "deterministic_train", False))
        has_data = getattr(dm, "train_dataset", None) is not None
        if self.teacher_cache is True and not deterministic:
            raise KDConfigError(
                "teacher_cache=true needs deterministic training inputs, but the data module "
                "augments them (or is not a DistillDataModule); set teacher_cache to null (auto).")
        if self.teacher is None or self.teacher_cache is False:
            return False
        return deterministic and has_data

    @torch.no_grad()
    def build_teacher_cache(self) -> None:
        """Run the teacher once over the training examples and keep its logits per index."""
        ds = self.trainer.datamodule.train_dataset
        n_source = int(ds.indices.max()) + 1 if len(ds) else 0
        cache = None
        chunk = 1024
        with self.trainer.precision_plugin.forward_context():
            for start in range(0, len(ds), chunk):
                x, _, idx = ds.get_batch(torch.arange(start, min(start + chunk, len(ds))))
                out = self.teacher(x.to(self.device)).float()
                if cache is None:
                    cache = torch.zeros(n_source, out.shape[-1], device=self.device)
                cache[idx.to(self.device)] = out
        self._cache = cache

    def on_train_start(self) -> None:
        self._cache = None
        self._cache_used = self._resolve_cache()
        if self._cache_used:
            self.build_teacher_cache()

    def on_train_end(self) -> None:
        self._cache = None

    # ---- learnable parameters and optimisation -------------------------------------------
    def learnable_parameters(self) -> Iterator[nn.Parameter]:
        """Student + method-owned modules; never the teacher."""
        for name, p in self.named_parameters():
            if not name.startswith("teacher.") and p.requires_grad:
                yield p

    def configure_optimizers(self):
        params = list(self.learnable_parameters())
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": self.hparams.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ---- checks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        k_data = getattr(dm, "num_classes", None)
        shape = getattr(dm, "input_shape", None)
        if self.num_classes is None and k_data is not None:
            self.num_classes = k_data
        if not self._metrics_built:
            if self.num_classes is None:
                raise KDConfigError("num_classes is unknown: set model.init_args.num_classes.")
            self._build_metrics(self.num_classes)
        if shape is not None:
            self._check_class_counts(shape, k_data)

    @torch.no_grad()
    def _check_class_counts(self, input_shape: tuple[int, ...], k_data: int | None) -> None:
        x = torch.zeros(2, *input_shape, device=self.device)
        counts = {}
        for name in ("student", "teacher"):
            net = getattr(self, name)
            if net is None:
                continue
            was_training = net.training
            net.eval()
            try:
                out = net(x)
            except Exception as err:  # noqa: BLE001 - we re-raise with context
                raise KDConfigError(
                    f"the {name} ({type(net).__name__}) cannot process inputs of shape "
                    f"{tuple(x.shape)} from the data module: {err}. Check its input size / "
                    f"channel arguments against the data set.") from None
            finally:
                net.train(was_training and name == "student")
            counts[name] = out.shape[-1]
        if k_data is not None:
            counts["data"] = k_data
        if self.num_classes is not None:
            counts["model.num_classes"] = self.num_classes
        if len(set(counts.values())) > 1:
            desc = ", ".join(f"{k}={v}" for k, v in counts.items())
            raise KDConfigError(
                f"class counts disagree ({desc}). Set num_classes of the student and the teacher "
                f"to the data set's number of classes.")

    # ---- metrics and logging --------------------------------------------------------------
    def _build_metrics(self, k: int) -> None:
        self.val_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.test_teacher_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.top5 = k > 5
        if self.top5:
            self.val_acc5 = MulticlassAccuracy(num_classes=k, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes=k, top_k=5, average="micro")
        self._metrics_built = True

    def log_terms(self, logits: Tensor | None = None, targets: Tensor | None = None,
                  **terms: Tensor) -> None:
        """Accumulate loss terms (and training accuracy) for per-epoch logging.

        Costs one tensor addition per term per step and no host-device synchronisation. Each
        term appears in TensorBoard as ``train/<name>`` (epoch mean over steps, averaged over
        DDP ranks).
        """
        for name, value in terms.items():
            v = value.detach().float()
            prev = self._term_sums.get(name)
            self._term_sums[name] = v if prev is None else prev + v
        self._term_steps += 1
        if logits is not None and targets is not None:
            correct = (logits.detach().argmax(-1) == targets).sum()
            self._train_correct = correct if self._train_correct is None else self._train_correct + correct
            self._train_seen += targets.numel()
        if self.log_step_terms:
            self.log_dict({f"train_step/{k}": v.detach() for k, v in terms.items()},
                          on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        out = {}
        if self._term_steps:
            for name, total in self._term_sums.items():
                out[f"train/{name}"] = strategy.reduce(total / self._term_steps, reduce_op="mean")
        if self._train_seen:
            stats = torch.stack([self._train_correct.float(),
                                 torch.tensor(float(self._train_seen), device=self._train_correct.device)])
            stats = strategy.reduce(stats, reduce_op="sum")
            out["train/acc"] = stats[0] / stats[1]
        if out:
            self.log_dict(out, on_step=False, on_epoch=True, sync_dist=True)
        self._term_sums, self._term_steps = {}, 0
        self._train_correct, self._train_seen = None, 0

    def _eval_step(self, batch, prefix: str) -> Tensor:
        x, y, _ = batch
        logits = self.student(x)
        loss = F.cross_entropy(logits.float(), y)
        self.log(f"{prefix}/loss", loss, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=y.numel())
        getattr(self, f"{prefix}_acc").update(logits, y)
        if self.top5:
            getattr(self, f"{prefix}_acc5").update(logits, y)
        return logits

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc.reset()
        metrics = {"val/acc": acc, "hp_metric": acc}
        if self.top5:
            metrics["val/acc_top5"] = self.val_acc5.compute()
            self.val_acc5.reset()
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")
        if self.teacher is not None:
            self.test_teacher_acc.update(self.teacher(batch[0]), batch[1])

    def on_test_epoch_end(self) -> None:
        metrics = {"test/acc": self.test_acc.compute()}
        self.test_acc.reset()
        if self.top5:
            metrics["test/acc_top5"] = self.test_acc5.compute()
            self.test_acc5.reset()
        if self.teacher is not None:
            metrics["test/teacher_acc"] = self.test_teacher_acc.compute()
            self.test_teacher_acc.reset()
        self.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)

    def predict_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        x, _, idx = batch
        logits = self.student(x)
        return {"index": idx, "logits": logits, "pred": logits.argmax(-1)}

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)


