"""Every exported method meets the contract of a :class:`~kd_lightning.methods.DistillationModule`.

The methods are discovered from ``kd_lightning.methods.__all__`` (no list to update) and each is
built from its shipped MNIST-1D config the way ``kd-lightning fit`` builds it, with a random
teacher (no checkpoint) and a tiny training subset. For each method:

- a fit of one step per epoch trains: every logged term is finite, the student changes, its
  parameters receive gradients and the teacher receives none and stays as it was (weights and
  buffers); a two-stage method gets one step in each stage;
- a batch with unlabelled rows (``y = UNLABELLED``) and MixUp batches
  (:class:`~kd_lightning.losses.labels.MixedTargets`, two minibatches per step) each train, or are
  refused before any step with a :class:`~kd_lightning.KDConfigError` that names the method;
- a ``bf16-mixed`` step gives finite terms;
- a checkpoint loaded into a fresh instance built from the same config gives the student's
  outputs exactly.

Adding a method: export it from ``kd_lightning.methods`` and ship ``configs/mnist1d/<name>.yaml``
whose ``model.class_path`` names it; this file then checks it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

import kd_lightning.methods as methods
from kd_lightning import KDConfigError
from kd_lightning.losses.labels import UNLABELLED, MixedTargets
from kd_lightning.methods import DistillationModule
from tests.conftest import CONFIGS


def _exported() -> dict[str, type]:
    """Every ``DistillationModule`` subclass in ``kd_lightning.methods.__all__``."""
    found = {}
    for name in methods.__all__:
        obj = getattr(methods, name)
        if isinstance(obj, type) and issubclass(obj, DistillationModule):
            found[name] = obj
    return found


def _mnist1d_configs() -> dict[str, Path]:
    """Method class name -> its MNIST-1D config (the shortest file name when several use it, e.g.
    ``response.yaml`` over ``response_ensemble.yaml``)."""
    configs = {}
    for path in sorted((CONFIGS / "mnist1d").glob("*.yaml"), key=lambda p: (len(p.stem), p.stem)):
        class_path = (yaml.safe_load(path.read_text()).get("model") or {}).get("class_path", "")
        configs.setdefault(class_path.rsplit(".", 1)[-1], path)
    return configs


EXPORTED = _exported()
CONFIGS_BY_METHOD = _mnist1d_configs()
# a base that other exported methods build on and that has no config of its own (the contract
# itself, the feature-distillation bases) is checked through those methods
BASES = {name for name, cls in EXPORTED.items()
         if name not in CONFIGS_BY_METHOD
         and any(other is not cls and issubclass(other, cls) for other in EXPORTED.values())}
METHODS = sorted(set(EXPORTED) - BASES)

# the tiny data every check trains on: 20 labelled MNIST-1D examples, 10 per batch, one minibatch
# per Lightning step
TINY_DATA = ["--data.train_subset", "20", "--data.batch_size", "10", "--data.batches_per_step", "1",
             "--data.eval_batch_size", "16"]


def test_the_methods_are_discovered():
    assert {"ResponseKD", "Supervised", "DeepMutualLearning", "MutualDistillation", "FitNet"} <= set(METHODS)
    assert "DistillationModule" in BASES and "NonFiniteGradientError" not in METHODS


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (data cache, runs/) land here


def _build(name: str, *extra: str):
    """``(model, datamodule)`` of ``name``'s MNIST-1D config as ``kd-lightning fit`` builds them,
    with a random teacher and the tiny data; a two-stage method gets one epoch per stage."""
    from kd_lightning.cli import cli_main

    config = CONFIGS_BY_METHOD.get(name)
    if config is None:
        pytest.fail(f"{name} is exported from kd_lightning.methods but no configs/mnist1d/*.yaml "
                    f"has model.class_path naming it: add one (a method is its loss, its class, an "
                    f"MNIST-1D config, its test and its study entry).")
    init = yaml.safe_load(config.read_text())["model"].get("init_args") or {}
    args = ["--config", str(config), *TINY_DATA]
    if "teacher_checkpoint" in init:
        args += ["--model.init_args.teacher_checkpoint", "null"]
    if "stage1_epochs" in init:
        args += ["--model.init_args.stage1_epochs", "1"]
    cli = cli_main([*args, *extra], run=False)
    return cli.model, cli.datamodule


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(**{**dict(max_epochs=2, limit_train_batches=1, limit_val_batches=0, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", devices=1), **kw})


class Recorder:
    """What a fit did: the terms the method logged and the training targets it was given."""

    def __init__(self, model: DistillationModule, dm) -> None:
        self.terms: list[dict[str, torch.Tensor]] = []
        self.targets: list = []
        log_terms = model.log_terms
        transfer = dm.on_after_batch_transfer

        def record_terms(logits=None, targets=None, **terms):
            self.terms.append({k: v.detach().float() for k, v in terms.items()})
            return log_terms(logits, targets, **terms)

        def record_batch(batch, dataloader_idx):
            batch = transfer(batch, dataloader_idx)
            if dm.trainer.training:  # a batch (x, y, index), or a group of them
                group = [batch] if isinstance(batch[0], torch.Tensor) else batch
                self.targets += [minibatch[1] for minibatch in group]
            return batch

        model.log_terms = record_terms
        dm.on_after_batch_transfer = record_batch

    def assert_finite(self) -> None:
        assert self.terms, "the method logged no loss terms"
        for terms in self.terms:
            bad = {k: v for k, v in terms.items() if not torch.isfinite(v).all()}
            assert not bad, f"non-finite terms: {bad}"


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(before[k], v)]


@pytest.mark.parametrize("name", METHODS)
def test_a_step_trains_the_student_and_never_the_teacher(name):
    model, dm = _build(name)
    record = Recorder(model, dm)
    student = _state(model.student)
    grads = {}
    for key, p in model.student.named_parameters():
        p.register_hook(lambda g, key=key: grads.setdefault(key, []).append(bool(torch.isfinite(g).all())))
    teacher = model.teacher
    teacher_state = _state(teacher) if teacher is not None else {}
    trainer = _trainer()
    trainer.fit(model, dm)
    assert trainer.global_step >= 2  # one step per epoch (for a two-stage method: one per stage)
    record.assert_finite()
    assert _changed(student, model.student), "the student did not change"
    assert grads and all(all(v) for v in grads.values()), grads
    if teacher is not None:
        assert not any(p.requires_grad for p in teacher.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        assert not _changed(teacher_state, teacher), "the teacher changed"


def _trains_or_refuses(name: str, model: DistillationModule, dm) -> Recorder:
    """Fit one step per epoch (per stage): either it trains (finite terms, the student changes)
    or the method refuses the data before any step with a KDConfigError that names it."""
    record = Recorder(model, dm)
    student = _state(model.student)
    trainer = _trainer()
    try:
        trainer.fit(model, dm)
    except KDConfigError as err:
        assert name in str(err), f"the refusal does not name the method: {err}"
        assert trainer.global_step == 0 and not _changed(student, model.student)
        return record
    assert record.targets, "no training batch reached the method"
    record.assert_finite()
    assert _changed(student, model.student), "the student did not change"
    return record


@pytest.mark.parametrize("name", METHODS)
def test_a_batch_with_unlabelled_rows_trains_or_is_refused(name):
    model, dm = _build(name, "--data.train_subset", "10", "--data.unlabelled", "10",
                       "--data.batch_size", "20")
    record = _trains_or_refuses(name, model, dm)
    for y in record.targets:  # (the batch the method trained on had both kinds of rows)
        assert (y == UNLABELLED).any() and (y != UNLABELLED).any()


@pytest.mark.parametrize("name", METHODS)
def test_a_mixup_batch_trains_or_is_refused(name):
    # two minibatches per step: each is mixed on its own
    model, dm = _build(name, "--data.mixup", "0.4", "--data.batches_per_step", "2")
    record = _trains_or_refuses(name, model, dm)
    assert all(isinstance(y, MixedTargets) for y in record.targets)
    if record.targets:  # trained: mixed inputs are never served from a teacher cache
        assert getattr(model, "teacher_cache_used", None) in (False, None)


@pytest.mark.parametrize("name", METHODS)
def test_a_bf16_mixed_step_is_finite(name):
    model, dm = _build(name)
    record = Recorder(model, dm)
    _trainer(precision="bf16-mixed").fit(model, dm)
    record.assert_finite()


@pytest.mark.parametrize("name", METHODS)
def test_a_checkpoint_restores_the_student_exactly(name, tmp_path):
    model, dm = _build(name)
    trainer = _trainer()
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh, fresh_dm = _build(name)
    x = dm.splits().x_test[:16]
    model.eval(), fresh.eval()
    with torch.no_grad():
        expected, before = model.student(x), fresh.student(x)
    assert not torch.equal(before, expected)  # (the fresh instance is the untrained student)
    # as `kd-lightning test --ckpt_path` restores it: the fresh instance is set up, then loaded
    _trainer(limit_test_batches=1).test(fresh, fresh_dm, ckpt_path=tmp_path / "last.ckpt",
                                        verbose=False)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.student(x), expected)
