"""Every Lightning (and torch) internal kd_lightning relies on, in one place.

Each name below is private to Lightning or torch, so a release may change it without notice.
``tests/training/test_lightning_compat.py`` pins the behaviour relied on, so that an upgrade that changes
one of them fails in CI instead of silently changing training.
"""

from __future__ import annotations

import os
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

#: attributes Lightning sets on the module around every hook call (about 40 times per training
#: step); they are plain strings, so ``nn.Module.__setattr__``'s search for parameters, buffers
#: and submodules can be skipped for them
HOOK_BOOKKEEPING_ATTRIBUTES = frozenset({"_current_fx_name"})

#: the common base class of torch's batch norm layers (BatchNorm1d/2d/3d, SyncBatchNorm, lazy ones)
BATCH_NORM_BASE = nn.modules.batchnorm._BatchNorm

class FastHookBookkeeping:
    """A base of a LightningModule (placed before ``pl.LightningModule``) that sets the
    :data:`HOOK_BOOKKEEPING_ATTRIBUTES` as plain attributes, without ``nn.Module.__setattr__``."""

    def __setattr__(self, name: str, value) -> None:
        if name in HOOK_BOOKKEEPING_ATTRIBUTES:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The trainer ``module`` is attached to, or ``None`` (``module.trainer`` raises instead)."""
    return module._trainer


def ddp_finds_unused_parameters(strategy) -> bool | None:
    """For a DDP strategy, whether it looks for unused parameters; ``None`` for other strategies."""
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    return bool(kwargs.get("find_unused_parameters"))


def drop_hyperparameter(module: pl.LightningModule, name: str) -> None:
    """Remove ``name`` from the saved hyperparameters and from those the logger records."""
    module.hparams.pop(name, None)
    getattr(module, "_hparams_initial", {}).pop(name, None)


def fused_kernel_devices() -> set[str]:
    """Device types on which torch's optimizers have fused kernels."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return set(_get_fused_kernels_supported_devices())


def cuda_check_env_var() -> str:
    """Lightning (lightning_fabric) sets this variable to ``"1"`` at import, which makes every
    ``torch.cuda.is_available()`` call (Adam makes one per step) load NVML anew: about 30 us on a
    CUDA build of torch without a GPU."""
    return "PYTORCH_NVML_BASED_CUDA_CHECK"


def no_gpu() -> bool:
    return torch.cuda.device_count() == 0


class ScopedFitEnvironment(Callback):
    """Two process-wide settings, changed for the duration of a fit and restored after it:

    - Lightning's warning "Found N module(s) in eval mode" is silenced: the frozen teacher is in
      eval mode on purpose;
    - on a machine without a GPU, Lightning's NVML-based CUDA check (:func:`cuda_check_env_var`)
      is turned off: with no GPU there is nothing for it to protect.
    """

    def __init__(self) -> None:
        self._saved: tuple | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        var = cuda_check_env_var()
        scope = warnings.catch_warnings()
        scope.__enter__()
        self._saved = (scope, os.environ.get(var))
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        if os.environ.get(var) == "1" and no_gpu():
            del os.environ[var]

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()  # a failed fit skips teardown

    def _restore(self) -> None:
        if self._saved is None:
            return
        scope, value = self._saved
        scope.__exit__(None, None, None)
        if value is not None:
            os.environ[cuda_check_env_var()] = value
        self._saved = None


def defer_tensorboard_hparams(logger) -> None:
    """Stop a TensorBoardLogger from writing its placeholder ``hp_metric = -1`` hparams session
    at the start of a run (``log_hyperparams(params)`` then only records the parameters for
    ``hparams.yaml``). TensorBoard keeps the first hparams session of a run and ignores later
    ones, so the session with the final metrics must be the first one written."""
    if hasattr(logger, "_default_hp_metric"):
        logger._default_hp_metric = False


#: LightningCLI parsers built so far in this process (see :class:`ReusedParser`)
_PARSERS: dict = {}


class ReusedParser:
    """A base of a LightningCLI (placed before it) that builds its argument parser once per
    process and set of ``setup_parser`` arguments, and reuses it for every later CLI of the same
    class: the parser (about 0.3 s of CPU to build: every class signature and docstring of the
    trainer, method and data module) is the same for every job of a study. Reused with it are
    LightningCLI's private ``_subcommand_parsers`` and ``_subcommand_method_arguments`` (which
    subcommand arguments are passed to the trainer's method)."""

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        key = (type(self), add_subcommands, repr(main_kwargs), repr(subparser_kwargs))
        if key not in _PARSERS:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            _PARSERS[key] = (self.parser, getattr(self, "_subcommand_parsers", None),
                             getattr(self, "_subcommand_method_arguments", None))
        self.parser, subcommand_parsers, method_arguments = _PARSERS[key]
        if add_subcommands:
            self._subcommand_parsers = subcommand_parsers
            self._subcommand_method_arguments = method_arguments
