"""Every exported method meets the contract of a :class:`~kd_lightning.methods.DistillationModule`,
and every shipped MNIST-1D config fits without a warning.

The methods are discovered from ``kd_lightning.methods.__all__`` (no list to update) and the
configs from ``configs/mnist1d/*.yaml``. Each config gets one ``kd-lightning fit`` (in process,
with the CLI's defaults: logger, checkpoints, the test after fit; a random teacher written where
the config loads it; a tiny training subset, one step per epoch, two epochs), which serves every
check of a default run:

- it trains: every logged term is finite, the student changes, its parameters receive gradients
  and the teacher receives none and stays as it was (weights and buffers); a two-stage method
  gets one step in each stage;
- it logs and writes what ``kd-lightning fit`` does (finite ``train/loss``, ``val/acc``,
  ``test/acc``, the run's ``config.yaml``), and its last checkpoint, loaded into a fresh instance
  built from the config (set up, then loaded, as ``kd-lightning test --ckpt_path`` does), gives
  the trained student's outputs exactly;
- it prints no warning that is not on :data:`ALLOWED_WARNINGS`, and none of the notices of
  :data:`FORBIDDEN_NOTICES`.

Each method (through its config with the shortest name) also gets a fit on a batch with unlabelled rows (``y = UNLABELLED``)
and one on MixUp batches (:class:`~kd_lightning.losses.labels.MixedTargets`, two minibatches per
step), which each train or are refused before any step with a
:class:`~kd_lightning.KDConfigError` that names the method, and a ``bf16-mixed`` fit whose terms
are finite.

Adding a method: export it from ``kd_lightning.methods`` and ship ``configs/mnist1d/<name>.yaml``
whose ``model.class_path`` names it; this file then checks it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
import yaml

import kd_lightning.methods as methods
from kd_lightning import KDConfigError
from kd_lightning.cli import KDLightningCLI, cli_main
from kd_lightning.losses.labels import UNLABELLED, MixedTargets
from kd_lightning.methods import DistillationModule
from tests.conftest import CONFIGS, prepare_config, tb_scalars


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
# a default fit's trainer, made tiny: one step per epoch, two epochs, one batch per evaluation
TINY_FIT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1"]

#: the warnings a default fit may print, each with the reason it is not fixed or filtered
ALLOWED_WARNINGS: list[tuple[str, str]] = [
    # (message regex, why it is allowed)
    (r"CRD: num_negatives=\d+ but each training example has only \d+ candidate negatives",
     "a real warning about the run: this test's 20-example subset has fewer negatives than the "
     "config asks for"),
]
#: Lightning notices (log records) that a default fit must not print: each was a cause fixed in
#: kd_lightning or a third-party notice filtered inside `kd-lightning` (kd_lightning.cli)
FORBIDDEN_NOTICES = ("will override existing callbacks", "litlogger", "Tip:")


def test_the_methods_are_discovered():
    assert {"ResponseKD", "Supervised", "DeepMutualLearning", "MutualDistillation", "FitNet"} <= set(METHODS)
    assert "DistillationModule" in BASES and "NonFiniteGradientError" not in METHODS
    assert {path.stem for path in SHIPPED} >= {"teacher", "response", "born_again", "response_ensemble"}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths (data cache, runs/) land here


def _config_of(name: str) -> Path:
    config = CONFIGS_BY_METHOD.get(name)
    if config is None:
        pytest.fail(f"{name} is exported from kd_lightning.methods but no configs/mnist1d/*.yaml "
                    f"has model.class_path naming it: add one (a method is its loss, its class, an "
                    f"MNIST-1D config, its test and its study entry).")
    return config


def _config_args(config: Path) -> list[str]:
    """``--config`` and what a config needs beyond it for a tiny run: one epoch per stage of a
    two-stage method; for a config whose teacher the command sets (born-again generations), the
    student's architecture as the teacher."""
    model = yaml.safe_load(config.read_text())["model"]
    init = model.get("init_args") or {}
    args = ["--config", str(config), *TINY_DATA]
    if "stage1_epochs" in init:
        args += ["--model.init_args.stage1_epochs", "1"]
    cls = EXPORTED.get(model["class_path"].rsplit(".", 1)[-1])
    if getattr(cls, "requires_teacher", False) and "teacher" not in init:
        args += ["--model.init_args.teacher", json.dumps(init["student"])]
    return args


#: each method's config parsed as ``kd-lightning fit`` parses it, with a random teacher and the
#: tiny data: each check instantiates its own model and data module from it
_PARSED: dict[str, KDLightningCLI] = {}


def _instantiate(cli: KDLightningCLI, **data):
    """A fresh ``(model, datamodule)`` from ``cli``'s parsed config, with ``data`` changed (as
    ``--data.<name> <value>`` would)."""
    config = cli.config.clone()
    sub = config.fit if "fit" in config else config
    for key, value in data.items():
        sub.data[key] = value
    built = cli.parser.instantiate_classes(config)
    built = built.fit if "fit" in built else built
    return built.model, built.data


def _build(name: str, **data):
    """``(model, datamodule)`` of ``name``'s MNIST-1D config as ``kd-lightning fit`` builds them,
    with a random teacher and the tiny data changed by ``data``; a two-stage method gets one
    epoch per stage."""
    if name not in _PARSED:
        config = _config_of(name)
        args = _config_args(config)
        if "teacher_checkpoint" in (yaml.safe_load(config.read_text())["model"].get("init_args") or {}):
            args += ["--model.init_args.teacher_checkpoint", "null"]
        _PARSED[name] = cli_main(args, run=False)
    return _instantiate(_PARSED[name], **data)


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


class WatchedFit(KDLightningCLI):
    """``kd-lightning fit`` recording, from the start of training, the method's terms and the
    gradients and weights of the student and the teacher."""

    def before_fit(self) -> None:
        super().before_fit()
        model = self.model
        self.record = Recorder(model, self.datamodule)
        self.student = _state(model.student)
        self.teacher = _state(model.teacher) if model.teacher is not None else None
        self.grads: dict[str, list[bool]] = {}
        for key, p in model.student.named_parameters():
            p.register_hook(lambda g, key=key: self.grads.setdefault(key, []).append(bool(torch.isfinite(g).all())))

    def after_fit(self) -> None:
        # the student as training left it (also in last.ckpt), before the test after fit loads
        # the best checkpoint (for a two-stage method, possibly one from before the student trained)
        model = self.model.eval()
        self.x = self.datamodule.splits().x_test[:16]
        with torch.no_grad():
            self.outputs = model.student(self.x)
        self.fitted = _state(model.student)
        super().after_fit()


def _run_reporting_warnings(args: list[str], caplog, cli_class=None):
    """``cli_main(args)``; fails on a warning not on :data:`ALLOWED_WARNINGS` and on a
    :data:`FORBIDDEN_NOTICES` log record."""
    with warnings.catch_warnings(record=True) as caught, mock.patch.object(sys, "argv", ["kd-lightning"]):
        # what `kd-lightning` run from a shell shows: Python's default filters (deprecation
        # warnings are for the developers of the code that triggers them), each warning every time
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        cli = cli_main(args, cli_class=cli_class)
    unexpected = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                  if not any(re.search(pattern, str(w.message)) for pattern, _ in ALLOWED_WARNINGS)]
    assert not unexpected, f"{args[0]} of {args[2]} printed warnings:\n" + "\n".join(unexpected)
    notices = [r.getMessage() for r in caplog.records if any(n in r.getMessage() for n in FORBIDDEN_NOTICES)]
    assert not notices, notices
    return cli


SHIPPED = sorted((CONFIGS / "mnist1d").glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.stem)
def test_a_default_fit_trains_the_student_only_restores_exactly_and_prints_no_warning(config, tmp_path, caplog):
    prepare_config(config, tmp_path)  # a random teacher wherever the config loads one
    args = _config_args(config)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        cli = _run_reporting_warnings(["fit", *args, *TINY_FIT], caplog, WatchedFit)
        model, trainer = cli.model, cli.trainer
        # trains: one step per epoch (for a two-stage method: one per stage), finite terms; the
        # student changes and gets gradients, the teacher neither
        assert trainer.global_step >= 2
        cli.record.assert_finite()
        assert [k for k, v in cli.fitted.items() if not torch.equal(cli.student[k], v)], \
            "the student did not change"
        assert cli.grads and all(all(v) for v in cli.grads.values()), cli.grads
        if cli.teacher is not None:
            assert not any(p.requires_grad for p in model.teacher.parameters())
            assert all(p.grad is None for p in model.teacher.parameters())
            assert not _changed(cli.teacher, model.teacher), "the teacher changed"
    # what `kd-lightning fit` logs and writes
    assert 0.0 <= float(trainer.callback_metrics["test/acc"]) <= 1.0
    log_dir = Path(trainer.log_dir)
    scalars = tb_scalars(log_dir)
    assert "train/loss" in scalars and all(map(math.isfinite, scalars["train/loss"]))
    assert "val/acc" in scalars and (log_dir / "config.yaml").is_file()
    # a fresh instance built from the config, set up and then loaded from last.ckpt as
    # `kd-lightning test --ckpt_path` does, computes what the student computed after training
    fresh, fresh_data = _instantiate(cli)
    fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh.student(cli.x), cli.outputs)  # (untrained)
    _trainer(limit_test_batches=1).test(fresh, fresh_data, verbose=False,
                                        ckpt_path=log_dir / "checkpoints" / "last.ckpt")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.student(cli.x), cli.outputs)


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
    model, dm = _build(name, train_subset=10, unlabelled=10, batch_size=20)
    record = _trains_or_refuses(name, model, dm)
    for y in record.targets:  # (the batch the method trained on had both kinds of rows)
        assert (y == UNLABELLED).any() and (y != UNLABELLED).any()


@pytest.mark.parametrize("name", METHODS)
def test_a_mixup_batch_trains_or_is_refused(name):
    # two minibatches per step: each is mixed on its own
    model, dm = _build(name, mixup=0.4, batches_per_step=2)
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
