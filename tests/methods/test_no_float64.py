"""No method creates a float64 tensor in its training step.

Consumer GPUs run float64 at 1/32 to 1/64 of float32 speed, so one float64 tensor in a step can
dominate a GPU run. Every exported method (the methods of ``test_conformance.py``, built from
their MNIST-1D configs as ``kd-lightning fit`` builds them, tiny data, a random teacher) trains
one step per epoch for two epochs (one per stage for a two-stage method) while a
``TorchDispatchMode`` watches every operator that runs from ``on_train_batch_start`` to
``on_train_batch_end`` -- the forward passes, the losses, the backward pass and the optimizer
step -- and records any that returns a float64 tensor, with the first kd_lightning source line
on its stack.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.methods.test_conformance import METHODS, _build, _trainer

PACKAGE = Path(__file__).resolve().parents[2] / "kd_lightning"

class _Float64Audit(TorchDispatchMode):
    """Records ``(operator, where)`` for every operator that returns a float64 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(x, torch.Tensor) and x.dtype == torch.float64 for x in tree_leaves(out)):
            self.found.append((str(func), _where()))
        return out


def _where() -> str:
    """The innermost frame in kd_lightning's source (else the innermost frame outside torch)."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        if Path(frame.filename).resolve().is_relative_to(PACKAGE):
            return f"{Path(frame.filename).resolve().relative_to(PACKAGE.parent)}:{frame.lineno}"
    for frame in reversed(frames):
        if "/torch/" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class _AuditSteps(pl.Callback):
    """The audit mode is active from the start to the end of each training batch."""

    def __init__(self) -> None:
        self.audit = _Float64Audit()
        self.active = False
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.audit.__enter__()
        self.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.close()
        self.steps += 1

    def close(self) -> None:
        if self.active:
            self.active = False
            self.audit.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (data cache, runs/) land here


def test_the_audit_sees_float64_in_the_backward_pass():
    audit = _Float64Audit()
    x = torch.randn(3, requires_grad=True)
    with audit:
        (x * 2.5).sum().backward()  # a Python scalar is no float64 tensor
        assert audit.found == []
        (x.double() * 2).sum().backward()
    where = dict(audit.found)
    assert "aten.ones_like.default" in where  # the backward pass's seed gradient
    assert "test_no_float64.py:" in where["aten._to_copy.default"]  # x.double(), located


@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_creates_no_float64_tensor(name):
    model, dm = _build(name)
    callback = _AuditSteps()
    trainer = _trainer(callbacks=[callback])
    try:
        trainer.fit(model, dm)
    finally:
        callback.close()
    assert callback.steps >= 2
    found = sorted(set(callback.audit.found))
    assert not found, f"{name}: float64 tensors in a training step: " + "; ".join(
        f"{op} at {where}" for op, where in found[:10])
