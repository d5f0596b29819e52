"""Input checks and dtype handling shared by the baseline losses (private)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kd_lightning import KDConfigError


def upcast(t: Tensor) -> Tensor:
    """float32 for half-precision (autocast) tensors; float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


def check_positive(name: str, value: float, hint: str = "") -> None:
    if not value > 0:
        raise KDConfigError(f"{name} must be > 0, got {value!r}.{(' ' + hint) if hint else ''}")


def check_non_negative(name: str, value: float, hint: str = "") -> None:
    if not value >= 0:
        raise KDConfigError(f"{name} must be >= 0, got {value!r}.{(' ' + hint) if hint else ''}")


def check_reduction(reduction: str) -> None:
    if reduction not in ("batchmean", "none"):
        raise KDConfigError(f"reduction must be 'batchmean' or 'none', got {reduction!r}.")


def check_same_batch(what: str, student: Tensor, teacher: Tensor) -> None:
    """Relation losses compare the same examples on both sides: batch sizes must agree."""
    if student.dim() < 1 or teacher.dim() < 1:
        raise KDConfigError(f"{what} needs batched inputs [B, ...]; got a scalar.")
    if student.shape[0] != teacher.shape[0]:
        raise KDConfigError(
            f"{what} compares the same examples on the student and the teacher side, but the "
            f"student input has {student.shape[0]} rows and the teacher input {teacher.shape[0]}. "
            f"Feed both networks the same batch.")


def check_logits(what: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise KDConfigError(
            f"{what} needs student and teacher logits of the same shape [B, K]; got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}.")


def as_list(feats: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A single feature tensor or a sequence of them (one per tapped layer) as a list."""
    return [feats] if isinstance(feats, Tensor) else list(feats)


def check_pairs(what: str, student: list[Tensor], teacher: list[Tensor]) -> None:
    if len(student) != len(teacher):
        raise KDConfigError(f"{what}: {len(student)} student features but {len(teacher)} teacher "
                            f"features; pass one teacher feature per student feature.")
    if not student:
        raise KDConfigError(f"{what}: no feature pairs given.")
