"""Checks of a method's arguments, and of its networks against the data, before anything is
trained: each raises :class:`~kd_lightning.KDConfigError` with what to change."""

from __future__ import annotations

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from kd_lightning import KDConfigError
from kd_lightning.metrics import dropout_modules


def check_weights(method: str, **weights: float) -> None:
    """Every loss weight must be a number >= 0."""
    for name, value in weights.items():
        if not value >= 0:
            raise KDConfigError(f"{method}: {name} must be >= 0, got {value}.")


def check_temperature(method: str, temperature: float) -> None:
    if not temperature > 0:
        raise KDConfigError(f"{method}: temperature must be > 0, got {temperature}; Hinton et al. "
                            f"use 1-20 (default 4).")


def check_base_arguments(method: type, teacher: nn.Module | None, teacher_checkpoint: str | None,
                         lr_scheduler_interval: str, distill_error_temperature: float) -> None:
    """The arguments every :class:`~kd_lightning.methods.DistillationModule` takes."""
    if method.requires_teacher and teacher is None:
        raise KDConfigError(
            f"{method.__name__} distils from a teacher network, but no teacher was given. "
            f"Set model.init_args.teacher (class_path + init_args) and "
            f"model.init_args.teacher_checkpoint (a checkpoint of `kd-lightning fit` with "
            f"kd_lightning.methods.Supervised).")
    if teacher is None and teacher_checkpoint is not None:
        raise KDConfigError("teacher_checkpoint is set but teacher is not: give the teacher "
                            "architecture as model.init_args.teacher.")
    if lr_scheduler_interval not in ("epoch", "step"):
        raise KDConfigError(
            f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}.")
    if not distill_error_temperature > 0:
        raise KDConfigError(f"distill_error_temperature must be > 0, got {distill_error_temperature}.")


def check_mc_dropout(samples: int, student: nn.Module, teacher: nn.Module | None) -> None:
    """``mc_dropout_samples`` must be an int >= 0, and > 0 only with a student that has dropout."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise KDConfigError(f"mc_dropout_samples must be an integer >= 0 (0 = off), got {samples!r}.")
    if samples == 0:
        return
    if not dropout_modules(student):
        raise KDConfigError(
            f"mc_dropout_samples={samples} asks for MC-dropout predictions, but the student "
            f"({type(student).__name__}) has no dropout layer (nn.Dropout* with p > 0); give it "
            f"dropout (e.g. kd_lightning.models.MLP with dropout: 0.2) or set mc_dropout_samples: 0.")
    if teacher is not None and not dropout_modules(teacher):
        rank_zero_warn(f"mc_dropout_samples: the teacher ({type(teacher).__name__}) has no dropout "
                       f"layer, so only its deterministic calibration is reported.")


@torch.no_grad()
def check_class_counts(student: nn.Module, teacher: nn.Module | None, input_shape: tuple[int, ...],
                       k_data: int | None, num_classes: int | None, device: torch.device) -> None:
    """Run both networks on two zero inputs of the data's shape: each must accept it, and the
    student's, the teacher's, the data's and the configured class counts must agree."""
    x = torch.zeros(2, *input_shape, device=device)
    counts = {}
    for name, net in (("student", student), ("teacher", teacher)):
        if net is None:
            continue
        was_training = net.training
        net.eval()
        try:
            out = net(x)
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise KDConfigError(
                f"the {name} ({type(net).__name__}) cannot process inputs of shape "
                f"{tuple(x.shape)} from the data module: {err}. Check its input size / "
                f"channel arguments against the data set.") from None
        finally:
            net.train(was_training and name == "student")
        counts[name] = out.shape[-1]
    if k_data is not None:
        counts["data"] = k_data
    if num_classes is not None:
        counts["model.num_classes"] = num_classes
    if len(set(counts.values())) > 1:
        desc = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise KDConfigError(
            f"class counts disagree ({desc}). Set num_classes of the student and the teacher "
            f"to the data set's number of classes.")


def check_data(module, dm) -> None:
    """``module``'s networks against the data module ``dm`` (:func:`check_class_counts`), when
    it gives its examples' shape."""
    shape = getattr(dm, "input_shape", None)
    if shape is None:
        return
    check_class_counts(module.student, module.teacher, shape, getattr(dm, "num_classes", None),
                       module.num_classes, module.device)
    if module.frozen_teacher is not None and module.frozen_teacher.taps is not None:
        module.frozen_teacher.taps.pop()  # the probe's features are not a training batch's
