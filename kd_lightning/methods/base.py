"""The small base class every distillation method builds on.

It owns, once for all methods: the frozen teacher (loading, freezing, eval mode, no gradient,
never optimised), the per-example teacher-output cache, which parameters are learnable,
optimizer/scheduler injection, metrics (torchmetrics, DDP-synced), and cheap per-epoch logging
of every loss term by name. A method subclass holds its hyperparameters and a
``training_step`` that composes loss terms from :mod:`kd_lightning.losses`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning import KDConfigError
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.models.weights import load_teacher_weights

# the frozen teacher is deliberately in eval mode while the student trains
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

# Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (fork safety), which makes every
# torch.cuda.is_available() call -- Adam calls it on every step -- load NVML anew (about 30 us)
# on machines with a CUDA build of torch and no GPU. With no GPU there is nothing to protect.
if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
    del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]


def check_kd_hyperparameters(method: str, temperature: float, alpha: float | None = None) -> None:
    """Validate the temperature (and soft-target weight) every KD-style method takes."""
    if temperature <= 0:
        raise KDConfigError(f"{method}: temperature must be > 0, got {temperature}; Hinton et al. "
                            f"use 1-20 (default 4).")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise KDConfigError(f"{method}: alpha must be in [0, 1], got {alpha}: it weighs the "
                            f"soft-target term against cross-entropy (default 0.9).")


def use_fused_kernel(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer rebuilt with ``fused=True`` when that is possible and was left unset.

    Eligible: a fresh optimizer (no state) whose class accepts ``fused``, with ``fused`` and
    ``foreach`` both left at ``None``, not ``differentiable``, and every parameter a floating
    tensor on a device with fused kernels. Anything else is returned unchanged.
    """
    import inspect

    defaults = optimizer.defaults
    if optimizer.state or "fused" not in inspect.signature(type(optimizer).__init__).parameters:
        return optimizer
    if defaults.get("fused") is not None or defaults.get("foreach") is not None:
        return optimizer
    if defaults.get("differentiable") or defaults.get("capturable"):
        return optimizer
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params or not all(p.device.type in devices and torch.is_floating_point(p) for p in params):
        return optimizer
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    kwargs = {k: v for k, v in defaults.items() if k not in ("fused", "foreach")}
    try:
        return type(optimizer)(groups, **{**kwargs, "fused": True})
    except (RuntimeError, ValueError, TypeError):
        return optimizer


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
            cached when it is on; tapped teacher features (:meth:`tap_teacher`) too when they
            fit in ``teacher_cache_mb``.
        teacher_cache_mb: memory budget (MiB, on the training device) for cached features.
        fused_optimizer: when the optimizer has a fused implementation (Adam, AdamW, SGD, ...)
            and neither ``fused`` nor ``foreach`` was set, use the fused kernel: the same update
            in one kernel call instead of a Python loop over parameters (on CPU, PyTorch's
            default is that loop). Off by default: the fused kernel rounds differently, so a
            run would no longer match the same optimizer in a hand-written loop bit for bit.
        log_step_terms: also log every loss term at every ``log_every_n_steps`` (costs time per
            step; epoch means are always logged).
    """

    #: methods that distil from a network teacher set this to True
    requires_teacher: bool = False
    #: the metric a ReduceLROnPlateau scheduler follows
    plateau_monitor: str = "val/loss"

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 teacher_checkpoint: str | None = None, num_classes: int | None = None,
                 optimizer: OptimizerCallable = torch.optim.Adam,
                 lr_scheduler: LRSchedulerCallable | None = None,
                 lr_scheduler_interval: str = "epoch", teacher_cache: bool | None = None,
                 teacher_cache_mb: float = 512.0, fused_optimizer: bool = False, log_step_terms: bool = False) -> None:
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
        self.teacher_cache_mb = teacher_cache_mb
        self.fused_optimizer = fused_optimizer
        self.log_step_terms = log_step_terms
        self._cache: Tensor | None = None  # [num_source_examples, K] teacher logits
        self._feature_cache: list[Tensor] | None = None  # tapped teacher features, same keys
        self._cache_used: bool | None = None  # set at the start of training
        self._teacher_taps: FeatureTaps | None = None
        self._term_records: dict[tuple[str, ...], list[list[Tensor]]] = {}
        self._pred_records: list[tuple[Tensor, Tensor]] = []
        self._last_logged_step = 0
        self._close_log_window = False
        self._metrics_built = False
        self._batches_per_step = 1  # data.batches_per_step of the current fit
        self._grouped_auto = False  # automatic optimisation carried out by the group driver
        if num_classes is not None:
            self._build_metrics(num_classes)

    # ---- lean per-step plumbing -------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        # Lightning sets this bookkeeping string around every hook call (about 40 times per
        # step); it is never a Parameter, Module or buffer, so nn.Module's slow path is skipped.
        if name == "_current_fx_name":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """``(x, y, index)`` batches (or groups of them): nothing to do when already on
        ``device``, else ``.to()``."""
        if isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) for t in batch):
            if all(t.device == device for t in batch):
                return batch
            return type(batch)(t.to(device, non_blocking=True) for t in batch)
        if isinstance(batch, list) and all(isinstance(b, (tuple, list)) for b in batch):
            return [self.transfer_batch_to_device(b, device, dataloader_idx) for b in batch]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- several minibatches per Lightning step (data.batches_per_step) -------------------
    def _setup_minibatch_groups(self) -> None:
        """With ``data.batches_per_step = k > 1`` each training batch is a list of ``k``
        minibatches. The method's own ``training_step`` still sees one minibatch at a time (with
        the ``batch_idx`` it would have had with ``k = 1``), and the optimizer steps once per
        minibatch: what Lightning's automatic optimisation does (zero_grad, backward, gradient
        clipping, step, step-interval schedulers; epoch-interval ones at the epoch's end) is
        done here through Lightning's manual-optimisation API, so precision plugins, DDP
        gradient sync, callbacks' optimizer hooks and ``global_step`` behave as usual."""
        # (the module stays in manual mode after fit, so trainer.global_step keeps counting the
        # optimizer steps; a later fit sets it up again from its own data module)
        self.__dict__.pop("training_step", None)
        if self._grouped_auto:
            self.automatic_optimization, self._grouped_auto = True, False
        dm = getattr(self.trainer, "datamodule", None)
        k = int(getattr(dm, "batches_per_step", 1) or 1)
        self._batches_per_step = k
        if k == 1:
            return
        if self.trainer.accumulate_grad_batches != 1:
            raise KDConfigError(
                f"data.batches_per_step={k} cannot be combined with trainer.accumulate_grad_batches="
                f"{self.trainer.accumulate_grad_batches}: set data.batches_per_step to 1 (or "
                f"raise data.batch_size instead of accumulating).")
        if self.automatic_optimization:
            self.automatic_optimization, self._grouped_auto = False, True
        method_step = type(self).training_step.__get__(self, type(self))

        def training_step(batch, batch_idx: int):
            return self._grouped_training_step(method_step, batch, batch_idx)

        self.__dict__["training_step"] = training_step  # shadows the class's method for this fit

    def _grouped_training_step(self, method_step, group: list, batch_idx: int) -> None:
        trainer = self.trainer
        k = self._batches_per_step
        opt = self.optimizers() if self._grouped_auto else None
        for j, minibatch in enumerate(group):
            if 0 < trainer.max_steps <= trainer.global_step:
                return None  # max_steps counts optimizer steps, not groups
            out = method_step(minibatch, batch_idx * k + j)
            if opt is None:  # the method optimises manually itself
                continue
            loss = out["loss"] if isinstance(out, dict) else out
            if loss is None:
                continue
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()  # gradient clipping happens in on_before_optimizer_step
            self._step_lr_schedulers("step", batch_idx * k + j + 1)
        if self._grouped_auto and batch_idx + 1 == trainer.num_training_batches:
            self._step_lr_schedulers("epoch", self.current_epoch + 1)

    def on_before_optimizer_step(self, optimizer) -> None:
        trainer = self.trainer
        if self._grouped_auto and trainer.gradient_clip_val:
            # where Lightning clips in automatic mode: after unscaling (AMP), before the step
            self.configure_gradient_clipping(optimizer, trainer.gradient_clip_val,
                                             trainer.gradient_clip_algorithm)

    def _step_lr_schedulers(self, interval: str, count: int, plateau: bool = False,
                            strict: bool = True) -> None:
        """Lightning's scheduler stepping for automatic optimisation (interval, frequency,
        ReduceLROnPlateau's monitor), for optimisation the module does itself (the group driver,
        MutualDistillation). ``strict=False`` skips a plateau scheduler whose metric is missing."""
        for config in self.trainer.lr_scheduler_configs:
            # manual optimisation drops Lightning's reduce_on_plateau/monitor keys: ask the scheduler
            is_plateau = isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if config.interval != interval or is_plateau != plateau or count % config.frequency:
                continue
            if not plateau:
                config.scheduler.step()
                continue
            monitor = config.monitor or self.plateau_monitor
            value = self.trainer.callback_metrics.get(monitor)
            if value is None:
                if strict:
                    raise KDConfigError(
                        f"ReduceLROnPlateau monitors {monitor!r}, which was not logged "
                        f"(available: {sorted(self.trainer.callback_metrics)}); run validation "
                        f"every epoch or use another scheduler.")
                continue
            config.scheduler.step(value)

    def teardown(self, stage: str) -> None:
        # drop the per-fit driver so the module pickles (torch.save(model), spawn launchers); the
        # optimisation mode stays, so trainer.global_step still counts this fit's optimizer steps
        if stage == "fit":
            self.__dict__.pop("training_step", None)

    @property
    def train_minibatches_per_epoch(self) -> float:
        """Optimizer-step minibatches per training epoch (per device), whatever
        ``data.batches_per_step`` is; ``inf`` when unknown."""
        n = self.trainer.num_training_batches
        k = self._batches_per_step
        if k == 1 or not math.isfinite(n):
            return n
        dm = self.trainer.datamodule
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)  # per rank under DDP
        per_rank = len(sampler) if hasattr(sampler, "__len__") else n * k * dm.batch_size
        full = per_rank // dm.batch_size if dm.drop_last else math.ceil(per_rank / dm.batch_size)
        return min(n * k, full)

    # ---- teacher ---------------------------------------------------------------------------
    def train(self, mode: bool = True):
        """Lightning calls ``train()`` on the whole module; the teacher stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def tap_teacher(self, layers: list[str], pre_activation: bool | list[bool] = False) -> FeatureTaps:
        """Record teacher features at ``layers`` (module paths) for :meth:`teacher_forward`.

        Call once in a method's ``__init__``. The tapped features are cached with the logits when
        the teacher cache is on and they fit in ``teacher_cache_mb``.
        """
        if self.teacher is None:
            raise KDConfigError("tap_teacher() needs a teacher network.")
        self._teacher_taps = FeatureTaps(self.teacher, layers, pre_activation)
        return self._teacher_taps

    @torch.no_grad()
    def teacher_forward(self, x: Tensor, index: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits and tapped features (see :meth:`tap_teacher`) for a batch.

        From the per-example cache when it is active (training, deterministic inputs), else a
        no-grad forward of the frozen teacher.
        """
        if self._cache is not None and index is not None and self.training:
            if self._feature_cache is not None:
                return self._cache[index], [f[index] for f in self._feature_cache]
            if self._teacher_taps is None:
                return self._cache[index], []
        logits = self.teacher(x)
        feats = self._teacher_taps.pop() if self._teacher_taps is not None else []
        return logits, feats

    @torch.no_grad()
    def teacher_logits(self, x: Tensor, index: Tensor | None = None) -> Tensor:
        """Teacher logits for a batch: from the cache when it is active, else a no-grad forward."""
        if self._cache is not None and index is not None and self.training:
            return self._cache[index]
        logits = self.teacher(x)
        if self._teacher_taps is not None:
            self._teacher_taps.pop()  # keep the taps' buffer empty
        return logits

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
        """Run the teacher once over the training examples; keep its logits (and tapped features,
        if they fit in ``teacher_cache_mb``) per example index."""
        ds = self.trainer.datamodule.train_dataset
        n_source = int(ds.indices.max()) + 1 if len(ds) else 0
        budget = self.teacher_cache_mb * 2**20
        logits_cache, feat_cache = None, None
        chunk = 1024
        with self.trainer.precision_plugin.forward_context():
            for start in range(0, len(ds), chunk):
                x, _, idx = ds.get_batch(torch.arange(start, min(start + chunk, len(ds))))
                idx = idx.to(self.device)
                out = self.teacher(x.to(self.device))
                feats = self._teacher_taps.pop() if self._teacher_taps is not None else []
                if logits_cache is None:
                    logits_cache = torch.zeros(n_source, out.shape[-1], dtype=out.dtype, device=self.device)
                    per_example = sum(f[0].numel() * f.element_size() for f in feats)
                    if feats and per_example * n_source <= budget:
                        feat_cache = [torch.zeros(n_source, *f.shape[1:], dtype=f.dtype, device=self.device)
                                      for f in feats]
                logits_cache[idx] = out
                if feat_cache is not None:
                    for store, f in zip(feat_cache, feats):
                        store[idx] = f
        self._cache, self._feature_cache = logits_cache, feat_cache

    def on_train_start(self) -> None:
        self._reset_term_logs()
        self._cache, self._feature_cache = None, None
        self._cache_used = self._resolve_cache()
        if self._cache_used:
            self.build_teacher_cache()

    def on_train_end(self) -> None:
        self._cache, self._feature_cache = None, None

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
        """Lightning's scheduler config for the configured LR scheduler (``None`` without one);
        ReduceLROnPlateau monitors ``val/loss``."""
        if self.lr_scheduler_factory is None:
            return None
        scheduler = self.lr_scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": self.hparams.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and self.automatic_optimization:
            # (under manual optimisation Lightning ignores the key; _step_lr_schedulers uses it)
            config["monitor"] = self.plateau_monitor
        return config

    def configure_optimizers(self):
        optimizer = self.build_optimizer(list(self.learnable_parameters()))
        config = self.lr_scheduler_config(optimizer)
        return optimizer if config is None else {"optimizer": optimizer, "lr_scheduler": config}

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
        if stage == "fit":
            self._setup_minibatch_groups()

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

        A step only keeps references to its detached terms and its predicted classes (one
        ``argmax``, no host-device synchronisation); they are reduced with a few tensor
        operations per logging window, not per step.
        Each term appears in TensorBoard as ``train/<name>`` (mean over the epoch's steps,
        averaged over DDP ranks); ``train/acc`` is the accuracy over the epoch's examples.
        """
        records = self._term_records.get(tuple(terms))
        if records is None:
            records = self._term_records[tuple(terms)] = []
        records.append([v.detach() for v in terms.values()])
        if logits is not None and targets is not None:
            self._pred_records.append((logits.detach().argmax(-1), targets))
        if self.log_step_terms:
            self.log_dict({f"train_step/{k}": v.detach() for k, v in terms.items()},
                          on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        # Lightning's self.log costs far more than a training step of a small model, and in
        # few-data runs an epoch can be a single step: log the running means once at least
        # `log_every_n_steps` optimizer steps have passed (and at the last epoch).
        trainer = self.trainer
        if self._grouped_auto:  # after validation, as Lightning does for automatic optimisation
            self._step_lr_schedulers("epoch", self.current_epoch + 1, plateau=True)
        steps_since = trainer.global_step - self._last_logged_step
        last_epoch = (trainer.max_epochs is not None and trainer.max_epochs > 0
                      and self.current_epoch >= trainer.max_epochs - 1) or (
            trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
        if (steps_since < trainer.log_every_n_steps and not last_epoch and not trainer.should_stop
                and not self._close_log_window):
            return
        sums: dict[str, Tensor] = {}
        steps: dict[str, int] = {}
        for names, records in self._term_records.items():  # terms may change between stages
            for i, name in enumerate(names):
                total = torch.stack([r[i] for r in records]).float().sum()
                sums[name] = total + sums[name] if name in sums else total
                steps[name] = steps.get(name, 0) + len(records)
        out = {f"train/{name}": total / steps[name] for name, total in sums.items()}
        if self._pred_records:
            preds = torch.cat([p for p, _ in self._pred_records])
            targets = torch.cat([t for _, t in self._pred_records])
            # DDP shards are padded to equal size, so the mean over ranks is the global accuracy
            out["train/acc"] = (preds == targets).float().mean()
        if out:
            self.log_dict(out, on_step=False, on_epoch=True, sync_dist=True)
        self._reset_term_logs()
        self.on_train_terms_logged()

    def close_log_window(self) -> None:
        """Make this epoch's end log the running term means even if the window is not full (e.g.
        at a stage boundary, so no logged mean mixes two different objectives)."""
        self._close_log_window = True

    def on_train_terms_logged(self) -> None:
        """Hook: called right after the running means of the loss terms were logged."""

    def _reset_term_logs(self) -> None:
        self._term_records, self._pred_records = {}, []
        self._last_logged_step = self.trainer.global_step
        self._close_log_window = False

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


