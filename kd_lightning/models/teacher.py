"""The frozen teacher as one component: weights, freezing, feature taps, per-example cache.

A distillation method asks its :class:`FrozenTeacher` for the teacher's logits (and tapped
features) of a batch; where they come from -- a no-grad forward of the frozen network, a cache
filled once per training example when the training inputs are deterministic, or one kept per
validation batch of a fit (:class:`EvalBatchCache`) -- is this module's business.
:class:`PerExampleCache` is the per-example cache, also used for other per-example constants
(MutualDistillation's fixed rules).

:func:`describe_teacher` is the line a fit prints about its teacher: its weights file, class,
parameter count, and the validation and test metrics recorded in the checkpoint (a checkpoint
written by ``kd-lightning fit`` records them under :data:`RECORDED_METRICS`: the validation's
when the checkpoint is saved, the test's when ``fit`` tests it after training).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from kd_lightning import KDConfigError
from kd_lightning.models.taps import FeatureTaps
from kd_lightning.models.weights import load_teacher_weights


class PerExampleCache:
    """Tensors stored per training example, looked up by the batch's ``index``.

    :meth:`fill` runs ``fn`` over the training set once (in chunks) and keeps each output tensor
    per example: ``fn(x) -> list of [B, ...] tensors``. Outputs whose storage would exceed
    ``budget_bytes`` (beyond the first ``always`` outputs, which are always kept) are dropped:
    :attr:`complete` then tells whether every output was kept.
    """

    def __init__(self) -> None:
        self.stores: list[Tensor] | None = None
        self.complete = False

    @property
    def active(self) -> bool:
        return self.stores is not None

    def clear(self) -> None:
        self.stores, self.complete = None, False

    @torch.no_grad()
    def fill(self, dataset, fn: Callable[[Tensor], list[Tensor]], device: torch.device,
             budget_bytes: float = float("inf"), always: int = 1, chunk: int = 1024) -> None:
        n_source = int(dataset.indices.max()) + 1 if len(dataset) else 0
        stores: list[Tensor] | None = None
        for start in range(0, len(dataset), chunk):
            x, _, idx = dataset.get_batch(torch.arange(start, min(start + chunk, len(dataset))))
            idx = idx.to(device)
            outs = fn(x.to(device))
            if stores is None:
                per_example = sum(o[0].numel() * o.element_size() for o in outs[always:])
                keep = len(outs) if per_example * n_source <= budget_bytes else always
                stores = [torch.zeros(n_source, *o.shape[1:], dtype=o.dtype, device=device)
                          for o in outs[:keep]]
                self.complete = keep == len(outs)
            for store, out in zip(stores, outs):
                store[idx] = out
        self.stores = stores

    def lookup(self, index: Tensor) -> list[Tensor]:
        return [s[index] for s in self.stores]


class EvalBatchCache:
    """The teacher's logits per validation batch, kept from the first time each batch is evaluated.

    A fit validates the same batches, in the same order and without augmentation, at every
    epoch, and the frozen teacher's eval-mode logits of a batch never change: computing them
    once per batch instead of once per epoch removes the teacher's forward from every later
    validation (a resnet20 teacher costs about twice its resnet8 student's forward). A batch is
    found by its example indices (the whole ``index`` tensor must match, so a batch that holds
    other examples is computed afresh). Batches that would take the cache over ``budget_bytes``
    are computed every time.
    """

    def __init__(self) -> None:
        self.batches: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        self.nbytes = 0

    def clear(self) -> None:
        self.batches, self.nbytes = {}, 0

    def logits(self, x: Tensor, index: Tensor, forward: Callable[[Tensor], Tensor],
               budget_bytes: float) -> Tensor:
        """The cached logits of the batch ``index``, else ``forward(x)`` (kept if it fits)."""
        key = (index.shape[0], int(index[0]), int(index[-1])) if index.numel() else (0, 0, 0)
        hit = self.batches.get(key)
        if hit is not None and torch.equal(hit[0], index):
            return hit[1]
        out = forward(x)
        size = out.numel() * out.element_size() + index.numel() * index.element_size()
        if hit is None and self.nbytes + size <= budget_bytes:
            self.batches[key] = (index.clone(), out)
            self.nbytes += size
        return out


class FrozenTeacher:
    """A teacher network that is never trained.

    The network is loaded from ``checkpoint`` (a ``kd-lightning fit`` checkpoint of
    :class:`~kd_lightning.methods.Supervised` or a plain ``state_dict``), frozen
    (``requires_grad_(False)``) and put in eval mode; its owner keeps it in eval mode across
    Lightning's ``train()`` calls and out of the optimizer.

    Args:
        net: the teacher network (registered on the owning module as ``teacher``).
        checkpoint: its weights, or ``None`` to use ``net`` as it is.
    """

    def __init__(self, net: nn.Module, checkpoint: str | None = None) -> None:
        if checkpoint is not None:
            load_teacher_weights(net, checkpoint)
        self.checkpoint = checkpoint
        net.requires_grad_(False)
        net.eval()
        self.net = net
        self.taps: FeatureTaps | None = None
        self.cache = PerExampleCache()
        self.val_cache = EvalBatchCache()

    def describe(self) -> str:
        """The line a fit prints about its teacher (:func:`describe_teacher`)."""
        return describe_teacher(self.net, self.checkpoint)

    def tap(self, layers: Sequence[str], pre_activation: bool | list[bool] = False) -> FeatureTaps:
        """Record the features at ``layers`` (module paths) on every forward of the teacher."""
        self.taps = FeatureTaps(self.net, layers, pre_activation)
        return self.taps

    def _forward(self, x: Tensor) -> list[Tensor]:
        logits = self.net(x)
        return [logits, *(self.taps.pop() if self.taps is not None else [])]

    @torch.no_grad()
    def outputs(self, x: Tensor, index: Tensor | None = None,
                from_cache: bool = True) -> tuple[Tensor, list[Tensor]]:
        """Logits and tapped features of the batch: from the cache when it holds them (and
        ``from_cache`` and ``index`` allow), else a no-grad forward."""
        if from_cache and index is not None and self.cache.active and self.cache.complete:
            logits, *feats = self.cache.lookup(index)  # complete: logits and every tapped feature
            return logits, feats
        logits, *feats = self._forward(x)
        return logits, feats

    @torch.no_grad()
    def logits(self, x: Tensor, index: Tensor | None = None, from_cache: bool = True) -> Tensor:
        """Logits of the batch: from the cache when it is active, else a no-grad forward."""
        if from_cache and index is not None and self.cache.active:
            return self.cache.stores[0][index]
        return self._forward(x)[0]

    def clear_caches(self) -> None:
        """Release the per-example and the validation-batch caches."""
        self.cache.clear()
        self.val_cache.clear()

    @torch.no_grad()
    def validation_logits(self, x: Tensor, index: Tensor, budget_mb: float) -> Tensor:
        """Eval-mode logits of a validation batch of a fit, computed once per batch
        (:class:`EvalBatchCache`, within ``budget_mb`` MiB); the caller makes sure the batch's
        inputs are a fixed function of ``index`` (no augmentation) and clears
        :attr:`val_cache` when the validation data may change."""
        return self.val_cache.logits(x, index, lambda v: self._forward(v)[0], budget_mb * 2**20)

    def outputs_with_input_gradient(self, x: Tensor) -> Tensor:
        """Logits as a differentiable function of ``x`` (the weights stay frozen): for losses
        whose input gradient runs through the teacher too."""
        logits, *_ = self._forward(x)
        return logits

    def prepare_cache(self, trainer, setting: bool | None, budget_mb: float) -> bool:
        """At the start of training: fill the cache when ``setting`` allows it (``None`` = auto)
        and the data module's training inputs are deterministic; returns whether it is used."""
        self.cache.clear()
        dm = getattr(trainer, "datamodule", None)
        deterministic = bool(getattr(dm, "deterministic_train", False))
        check_teacher_cache_setting(setting, deterministic)
        use = setting is not False and deterministic and getattr(dm, "train_dataset", None) is not None
        if use:
            self.fill_cache(dm.train_dataset, trainer.lightning_module.device, budget_mb,
                            trainer.precision_plugin.forward_context)
        return use

    def fill_cache(self, dataset, device: torch.device, budget_mb: float, forward_context) -> None:
        """Run the teacher once over ``dataset``; keep the logits per example, and the tapped
        features too when they fit in ``budget_mb`` MiB."""

        def fn(x: Tensor) -> list[Tensor]:
            with forward_context():
                return self._forward(x)

        self.cache.fill(dataset, fn, device, budget_mb * 2**20)


def check_teacher_cache_setting(setting: bool | None, deterministic_inputs: bool) -> None:
    if setting is True and not deterministic_inputs:
        raise KDConfigError(
            "teacher_cache=true needs deterministic training inputs, but the data module "
            "augments them (or is not a DistillDataModule); set teacher_cache to null (auto).")


#: the checkpoint key under which a fit records the metrics of the saved weights
RECORDED_METRICS = "recorded_metrics"


def _scalars(metrics: Mapping, prefix: str) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k.startswith(prefix) and torch.as_tensor(v).numel() == 1}


def record_validation_metrics(trainer, checkpoint: dict) -> None:
    """Record in ``checkpoint`` (being saved) the metrics of the trainer's last validation
    (``val/...``; nothing when the run has no validation)."""
    values = _scalars(trainer.callback_metrics, "val/") if trainer is not None else {}
    if values:
        checkpoint[RECORDED_METRICS] = {**checkpoint.get(RECORDED_METRICS, {}), **values}


def record_test_metrics(path: str | Path, metrics: Mapping) -> bool:
    """Add the ``test/...`` values of ``metrics`` to the checkpoint file ``path`` (rewritten
    atomically: a temporary file renamed into place). False, with the file unchanged, when it
    cannot be read as a checkpoint dict or there is nothing to add."""
    values = _scalars(metrics, "test/")
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any file torch cannot read safely is left as it is
        return False
    if not values or not isinstance(checkpoint, dict):
        return False
    checkpoint[RECORDED_METRICS] = {**checkpoint.get(RECORDED_METRICS, {}), **values}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(buffer.getvalue())
    os.replace(partial, path)
    return True


def recorded_metrics(path: str | Path) -> dict[str, float] | None:
    """The metrics recorded in the checkpoint file ``path``; ``None`` when it records none (a
    plain ``state_dict``, a checkpoint from elsewhere or from before they were recorded). Reads
    the file memory-mapped, so the tensors' data is not read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - e.g. a legacy (non-zip) file, which cannot be mapped
        return None
    recorded = checkpoint.get(RECORDED_METRICS) if isinstance(checkpoint, dict) else None
    return dict(recorded) if isinstance(recorded, Mapping) and recorded else None


def _recorded_accuracy(checkpoint: str) -> str:
    recorded = recorded_metrics(checkpoint)
    shown = [k for k in ("val/acc", "test/acc", "test/errors") if k in (recorded or {})]
    if not shown:
        return "validation/test accuracy not recorded in the checkpoint"
    return "  ".join(f"{k} {recorded[k]:.0f}" if k.endswith("errors") else f"{k} {recorded[k]:.4f}"
                     for k in shown)


def _network(net: nn.Module) -> str:
    return f"{type(net).__name__}, {sum(p.numel() for p in net.parameters()):,} parameters"


def _weights(net: nn.Module, checkpoint: str | None) -> str:
    if checkpoint is None:
        return f"{_network(net)}, weights as constructed (no checkpoint)"
    return f"{checkpoint} ({_network(net)})  {_recorded_accuracy(checkpoint)}"


def describe_teacher(net: nn.Module, checkpoint: str | None) -> str:
    """``teacher: <file> (<class>, <n> parameters)  val/acc ...  test/acc ...`` (the accuracies
    the checkpoint records, or that it records none); an
    :class:`~kd_lightning.models.EnsembleTeacher` without a checkpoint of its own names each
    member's."""
    members = getattr(net, "members", None)
    checkpoints = getattr(net, "checkpoints", None)
    if checkpoint is None and isinstance(members, nn.ModuleList) and checkpoints is not None:
        parts = [f"member {i}: {_weights(m, c)}" for i, (m, c) in enumerate(zip(members, checkpoints))]
        return f"teacher: {_network(net)} in {len(members)} members; " + "; ".join(parts)
    return f"teacher: {_weights(net, checkpoint)}"
