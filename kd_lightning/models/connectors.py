"""Connectors: small learnable maps from a student feature to the teacher's feature space.

Feature distillation compares a student feature with a teacher feature of another shape. A
connector owned by the method (a submodule of it, so the optimizer trains it with the student and
the checkpoint stores it) bridges the channel counts:

- feature maps ``[B, C, L]`` or ``[B, C, H, W]``: a 1x1 convolution + batch norm,
  ``C_s -> C_t`` (Heo et al., AAAI 2019 use this connector for activation boundaries; FitNets'
  regressor, Romero et al. 2015, is a convolution as well);
- vectors ``[B, D]`` (or a map on one side and a vector on the other): a linear layer on the
  flattened features, ``D_s -> D_t``.

A 1x1 convolution leaves the spatial size unchanged; when the student's and the teacher's maps
differ in size, the losses pool the larger one down (see :mod:`kd_lightning.losses.feature`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kd_lightning import KDConfigError

__all__ = ["ConvConnector", "LinearConnector", "build_connector"]


class ConvConnector(nn.Module):
    """1x1 convolution (no bias) + batch norm, for 1D (``dims=1``) or 2D (``dims=2``) maps."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise KDConfigError(f"ConvConnector: dims must be 1 or 2, got {dims}.")
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv = conv(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = bn(out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class LinearConnector(nn.Module):
    """Linear map on flattened features ``[B, in_features] -> [B, out_features]``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.flatten(x, 1))


def build_connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """The connector from a student feature to a teacher feature, by their per-example shapes.

    Args:
        student_shape: ``(C,)``, ``(C, L)`` or ``(C, H, W)`` (no batch dimension).
        teacher_shape: likewise.

    Both maps of the same dimensionality -> :class:`ConvConnector`; one of them a vector ->
    :class:`LinearConnector` on the flattened features (the teacher's target is flattened too).
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) == len(t) and len(s) in (2, 3):
        return ConvConnector(s[0], t[0], dims=len(s) - 1)
    if len(s) == 1 or len(t) == 1:
        return LinearConnector(math.prod(s), math.prod(t))
    raise KDConfigError(
        f"cannot connect a student feature of shape {s} to a teacher feature of shape {t} (per "
        f"example): a 1D map [C, L] can only be matched with a 1D map, a 2D map [C, H, W] with a "
        f"2D map. Tap layers whose outputs have the same kind of shape, or a vector layer.")
