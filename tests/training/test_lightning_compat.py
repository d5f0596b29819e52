"""Pins every Lightning/torch internal that kd_lightning.training.lightning_compat relies on, so an
upgrade that changes one fails here instead of silently changing training."""

from __future__ import annotations

import os
import sys
import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

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


def test_a_cli_without_seeding_leaves_the_process_seed_alone(monkeypatch):
    from pytorch_lightning.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["kd-lightning"])

    class ParseOnly(LightningCLI):
        def instantiate_classes(self) -> None:
            pass

    class ParseOnlyNoSeed(compat.NoCLISeeding, ParseOnly):
        pass

    seeds = {}
    for cls in (ParseOnly, ParseOnlyNoSeed):
        torch.manual_seed(7)
        cls(Supervised, DistillDataModule, run=False,
            args=["--seed_everything", "123", "--model.student", "kd_lightning.models.MLP"])
        seeds[cls] = torch.initial_seed()
    assert seeds == {ParseOnly: 123, ParseOnlyNoSeed: 7}  # LightningCLI seeds; the mixin stops it


def test_cli_parsers_built_once_serve_a_second_cli(tmp_path, monkeypatch):
    """A CLI that reuses the parsers (main and subcommand ones) a first CLI built runs its
    subcommand the same way."""
    from kd_lightning.cli import KDLightningCLI, cli_main

    built, cache = [], {}

    class Reusing(KDLightningCLI):
        def setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs) -> None:
            if add_subcommands not in cache:
                super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
                built.append(add_subcommands)
                cache[add_subcommands] = compat.cli_parsers(self)
            compat.reuse_cli_parsers(self, cache[add_subcommands])

    args = ["fit", "--model", "kd_lightning.methods.Supervised", "--model.student", "kd_lightning.models.MLP",
            "--data.train_subset", "200", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["kd-lightning"])
    monkeypatch.chdir(tmp_path)  # the default logger writes to ./runs
    first, second = cli_main(args, cli_class=Reusing), cli_main(args, cli_class=Reusing)
    parser, subcommand_parsers, method_arguments = cache[True]
    assert built == [True] and second.parser is first.parser is parser
    assert set(subcommand_parsers) == set(method_arguments) == {"fit", "validate", "test", "predict"}
    assert first.trainer.global_step == second.trainer.global_step == 2
