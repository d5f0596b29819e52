"""LeNet-5 for 28x28 images (MNIST-style), with a width multiplier."""

from __future__ import annotations

import math

import torch
from torch import nn

from kd_lightning import KDConfigError

__all__ = ["LeNet5", "LeNet5Half", "lenet5_half"]


def _scaled(size: int, mult: float) -> int:
    """``size * mult`` rounded half-up, at least 1."""
    return max(1, int(math.floor(size * mult + 0.5)))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., "Gradient-Based Learning Applied to Document Recognition",
    Proc. IEEE 1998), in the common modern form with ReLU and max pooling.

    Layout for 28x28 inputs (module paths for forward hooks)::

        conv1 = Conv2d(in_channels, 6, 5, padding=2) -> relu1 -> pool1   (28 -> 14)
        conv2 = Conv2d(6, 16, 5)                     -> relu2 -> pool2   (14 -> 10 -> 5)
        flatten (16 * 5 * 5 = 400)
        fc1 = Linear(400, 120) -> relu3
        fc2 = Linear(120, 84)  -> relu4     (penultimate embedding, feature_dim = 84)
        fc  = Linear(84, num_classes)

    Reference size: 61,706 parameters with ``num_classes=10``, ``in_channels=1``.
    Every channel / hidden size (6, 16, 120, 84) is multiplied by ``width_mult`` and
    rounded half-up (minimum 1).

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        width_mult: Width multiplier for all conv channels and hidden layers.
        input_size: Spatial side of the (square) input; 28 for MNIST. Only
            changes the input size of ``fc1``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 1.0,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise KDConfigError(
                f"LeNet5: num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}."
            )
        if not width_mult > 0:
            raise KDConfigError(f"LeNet5: width_mult must be > 0, got {width_mult}.")
        # conv1 keeps the size (padding 2), pool halves, conv2 (k=5, no pad) removes 4, pool halves.
        side = ((int(input_size) // 2) - 4) // 2
        if side < 1:
            raise KDConfigError(f"LeNet5: input_size={input_size} is too small (need >= 12).")

        c1, c2 = _scaled(6, width_mult), _scaled(16, width_mult)
        h1, h2 = _scaled(120, width_mult), _scaled(84, width_mult)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.width_mult = float(width_mult)
        self.input_size = int(input_size)
        self.feature_dim: int = h2

        self.conv1 = nn.Conv2d(self.in_channels, c1, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU(inplace=False)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.relu2 = nn.ReLU(inplace=False)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * side * side, h1)
        self.relu3 = nn.ReLU(inplace=False)
        self.fc2 = nn.Linear(h1, h2)
        self.relu4 = nn.ReLU(inplace=False)
        self.fc = nn.Linear(h2, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding ``[B, feature_dim]`` (post-ReLU ``fc2`` output)."""
        if x.dim() == 3 and self.in_channels == 1:
            x = x.unsqueeze(1)  # [B, H, W] grayscale
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.input_size \
                or x.shape[-2] != self.input_size:
            raise ValueError(
                f"LeNet5 was built for [B, {self.in_channels}, {self.input_size}, {self.input_size}] "
                f"inputs, got {tuple(x.shape)}; set in_channels / input_size accordingly."
            )
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        return self.relu4(self.fc2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc(self.forward_features(x))


class LeNet5Half(LeNet5):
    """Half-width LeNet-5 (``width_mult=0.5``): 3/8 conv channels, 60/42 hidden units.

    A common small student for a LeNet-5 teacher (see :class:`LeNet5`, LeCun et al.
    1998). Reference size: 15,738 parameters with 10 classes and 28x28 grayscale
    inputs (about a quarter of LeNet-5's 61,706).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__(
            num_classes=num_classes, in_channels=in_channels, width_mult=0.5, input_size=input_size
        )


def lenet5_half(num_classes: int = 10, in_channels: int = 1) -> LeNet5Half:
    """Build a :class:`LeNet5Half` (LeNet-5 with ``width_mult=0.5``)."""
    return LeNet5Half(num_classes=num_classes, in_channels=in_channels)
