"""1-D convolutional classifier (the MNIST-1D reference CNN)."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning import KDConfigError

__all__ = ["ConvNet1D"]


def _conv_out_len(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class ConvNet1D(nn.Module):
    """Three strided Conv1d layers followed by a linear classifier.

    Reference: the CNN baseline of MNIST-1D (Greydanus & Kobak, "Scaling Down Deep
    Learning with MNIST-1D", ICML 2024). With ``width=25`` and ``input_length=40``
    the sequence length goes 40 -> 19 -> 10 -> 5, the flattened embedding has
    125 features and the model has 5,210 parameters (10 classes).

    Layout (module paths for forward hooks)::

        conv1 = Conv1d(in_channels, width, 5, stride=2, padding=1) -> relu1
        conv2 = Conv1d(width, width, 3, stride=2, padding=1, groups=groups) -> relu2
        conv3 = Conv1d(width, width, 3, stride=2, padding=1, groups=groups) -> relu3
        flatten -> fc = Linear(width * final_length, num_classes)

    The ReLUs are separate, non in-place modules, so hooks on ``conv1``/``conv2``/
    ``conv3`` see pre-activation features and hooks on ``relu*`` post-activation ones.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels. ``[B, L]`` inputs are accepted when
            ``in_channels == 1`` (the channel dimension is added).
        input_length: Sequence length ``L`` of the input (fixes the size of ``fc``).
        width: Number of channels of every conv layer.
        groups: Channel groups of ``conv2`` and ``conv3`` (default 1, the reference CNN). With
            ``groups=g`` those convs have ``g`` times fewer weights while every layer keeps
            ``width`` channels: a smaller student whose feature maps have the teacher's channel
            count, as FSP distillation needs (FSP matrices are ``C1 x C2``).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_length: int = 40,
        width: int = 25,
        groups: int = 1,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or width < 1:
            raise KDConfigError(
                f"ConvNet1D: num_classes, in_channels and width must be >= 1, got "
                f"num_classes={num_classes}, in_channels={in_channels}, width={width}."
            )
        if groups < 1 or width % groups != 0:
            raise KDConfigError(
                f"ConvNet1D: groups must be >= 1 and divide width, got groups={groups}, "
                f"width={width}."
            )
        length = int(input_length)
        for kernel in (5, 3, 3):
            length = _conv_out_len(length, kernel, stride=2, padding=1)
        if length < 1:
            raise KDConfigError(
                f"ConvNet1D: input_length={input_length} is too short for three stride-2 convs."
            )

        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.input_length = int(input_length)
        self.width = int(width)
        self.groups = int(groups)
        self.final_length: int = length
        self.feature_dim: int = self.width * length

        self.conv1 = nn.Conv1d(self.in_channels, self.width, kernel_size=5, stride=2, padding=1)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv1d(self.width, self.width, kernel_size=3, stride=2, padding=1,
                               groups=self.groups)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv1d(self.width, self.width, kernel_size=3, stride=2, padding=1,
                               groups=self.groups)
        self.relu3 = nn.ReLU(inplace=False)
        self.fc = nn.Linear(self.feature_dim, self.num_classes)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3:
            raise ValueError(
                f"ConvNet1D expects [B, L] or [B, C, L] inputs, got shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels or x.shape[2] != self.input_length:
            raise ValueError(
                f"ConvNet1D was built for [B, {self.in_channels}, {self.input_length}] inputs, "
                f"got {tuple(x.shape)}; set in_channels / input_length accordingly."
            )
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened post-ReLU ``conv3`` output ``[B, feature_dim]``."""
        x = self._check_input(x)
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc(self.forward_features(x))
