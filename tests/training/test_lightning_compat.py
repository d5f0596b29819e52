"""Pins every Lightning/torch internal that kd_lightning.training.lightning_compat relies on, so an
upgrade that changes one fails here instead of silently changing training."""

from __future__ import annotations

import ast
import os
import warnings
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

import kd_lightning
from kd_lightning.data import DistillDataModule
from kd_lightning.methods import Supervised
from kd_lightning.models import MLP
from kd_lightning.training import lightning_compat as compat


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(**{**dict(max_epochs=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False,
                                accelerator="cpu", devices=1, limit_val_batches=0), **kw})


def test_hook_bookkeeping_attribute_is_set_around_hooks():
    seen = []

    class Probe(Supervised):
        def on_train_epoch_start(self):
            seen.append(self.__dict__.get("_current_fx_name"))

    model = Probe(student=MLP(), optimizer=partial(torch.optim.Adam, lr=1e-2))
    _trainer().fit(model, DistillDataModule("mnist1d", train_subset=200))
    assert seen == ["on_train_epoch_start"]
    for name in compat.HOOK_BOOKKEEPING_ATTRIBUTES:  # a plain attribute, never a module/parameter
        assert name in model.__dict__ and name not in model._modules and name not in model._parameters


def test_attached_trainer_is_none_outside_a_fit_and_the_trainer_inside():
    model = Supervised(student=MLP(), num_classes=10)
    assert compat.attached_trainer(model) is None
    trainer = _trainer()
    trainer.fit(model, DistillDataModule("mnist1d", train_subset=200))
    assert compat.attached_trainer(model) is trainer


def test_ddp_strategy_exposes_find_unused_parameters():
    assert compat.ddp_finds_unused_parameters(DDPStrategy(find_unused_parameters=True)) is True
    assert compat.ddp_finds_unused_parameters(DDPStrategy()) is False
    assert compat.ddp_finds_unused_parameters(object()) is None


def test_dropped_hyperparameter_leaves_saved_and_logged_hparams():
    model = Supervised(student=MLP(), num_classes=10, teacher_cache_mb=64.0)
    assert "teacher_cache_mb" in model.hparams and "teacher_cache_mb" in model.hparams_initial
    compat.drop_hyperparameter(model, "teacher_cache_mb")
    assert "teacher_cache_mb" not in model.hparams and "teacher_cache_mb" not in model.hparams_initial


def test_fused_kernel_devices_include_cpu():
    assert "cpu" in compat.fused_kernel_devices()


def test_lightning_sets_the_cuda_check_variable_and_the_fit_scope_restores_it():
    assert os.environ.get(compat.cuda_check_env_var()) == "1"  # lightning_fabric sets it at import
    seen = {}

    class Probe(Supervised):
        def on_train_start(self):
            super().on_train_start()
            seen["var"] = os.environ.get(compat.cuda_check_env_var())

    filters = list(warnings.filters)
    _trainer().fit(Probe(student=MLP(), optimizer=partial(torch.optim.Adam, lr=1e-2)),
                   DistillDataModule("mnist1d", train_subset=200))
    assert seen["var"] == (None if compat.no_gpu() else "1")
    assert os.environ.get(compat.cuda_check_env_var()) == "1"
    assert warnings.filters == filters  # the fit's warning filter is gone again


def test_manual_optimisation_mode_is_read_per_step_and_global_step_follows_it():
    """The grouped fit relies on: Lightning checks ``automatic_optimization`` when it runs a
    step (not only at setup), global_step counts LightningOptimizer steps in manual mode, and
    trainer-level clipping is verified against the mode before ``setup`` hooks run."""
    model = Supervised(student=MLP(), optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = _trainer()
    trainer.fit(model, DistillDataModule("mnist1d", batch_size=100, train_subset=1000, batches_per_step=5))
    assert not model.automatic_optimization and trainer.global_step == 10
    loop = trainer.fit_loop.epoch_loop
    assert loop.manual_optimization.optim_step_progress.total.completed == 10
    assert loop.automatic_optimization.optim_progress.optimizer_steps == 0


def test_a_failed_fit_restores_the_process_settings_too():
    class Failing(Supervised):
        def compute_losses(self, x, y, index):
            raise RuntimeError("boom")

    filters = list(warnings.filters)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer().fit(Failing(student=MLP(), num_classes=10), DistillDataModule("mnist1d", train_subset=200))
    assert os.environ.get(compat.cuda_check_env_var()) == "1"
    assert warnings.filters == filters


def test_batch_norm_base_is_the_base_of_every_batch_norm():
    for layer in (torch.nn.BatchNorm1d(4), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm3d(4),
                  torch.nn.SyncBatchNorm(4), torch.nn.LazyBatchNorm1d()):
        assert isinstance(layer, compat.BATCH_NORM_BASE)
    assert not isinstance(torch.nn.LayerNorm(4), compat.BATCH_NORM_BASE)
    assert not isinstance(torch.nn.GroupNorm(2, 4), compat.BATCH_NORM_BASE)


# libraries whose underscored names are internals: only lightning_compat.py may use them
_LIBRARIES = ("pytorch_lightning", "lightning", "lightning_fabric", "torch", "torchmetrics", "jsonargparse")
# underscored names kd_lightning reaches outside lightning_compat.py, each with its reason
_ALLOWED = {
    # a torchvision dataset subclass overrides torchvision's integrity hook and calls the parent's
    ("kd_lightning/data/sources.py", "super()._check_integrity"),
}


def _private_uses(path: Path) -> list[tuple[str, int, str]]:
    """Underscored names ``path`` imports from a library, or reads on an object that is not its
    own (``self`` / ``cls``): both reach into another package's internals."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _LIBRARIES:
            names = node.module.split(".") + [a.name for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith("_") and not n.startswith("__")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_library_internal_is_used_outside_lightning_compat():
    root = Path(kd_lightning.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "lightning_compat.py":
            continue
        rel = path.relative_to(root.parent).as_posix()
        offenders += [f"{rel}:{line}: {name}" for line, name in _private_uses(path)
                      if (rel, name) not in _ALLOWED]
    assert not offenders, ("library internals used outside kd_lightning/training/lightning_compat.py "
                           "(wrap each there, with a test here): " + "; ".join(offenders))


def test_the_scan_sees_a_private_import_and_attribute(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from pytorch_lightning.trainer.connectors import _x\n"
                     "def f(trainer):\n    return trainer._fit_loop, self_free()\n")
    assert [name for _, name in _private_uses(probe)] == ["_x", "trainer._fit_loop"]
