"""Two-convolution network with dropout for 28x28 digits (an MNIST teacher)."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning import KDConfigError

__all__ = ["MnistCNN"]


class MnistCNN(nn.Module):
    """Two 5x5 convolutions, max pooling, a dropout-regularised hidden layer.

    The LeNet-style layout of TensorFlow's "Deep MNIST" tutorial (32 and 64 filters of 5x5, a
    fully connected hidden layer, dropout before the classifier), used here as the teacher of
    Hinton et al. 2015's MNIST experiment. Their teacher was a 784-1200-1200-10 MLP trained with
    dropout, weight constraints and +-2 pixel jitter to 67 test errors; a convolutional network
    with dropout and the same jitter reaches that error in a few epochs on a CPU.

    Layout for 28x28 inputs (module paths for forward hooks)::

        conv1 = Conv2d(in_channels, c1, 5, padding=2) -> relu1 -> pool1   (28 -> 14)
        conv2 = Conv2d(c1, c2, 5, padding=2)          -> relu2 -> pool2   (14 -> 7)
        flatten (c2 * 7 * 7)
        fc1 = Linear(c2 * 7 * 7, hidden) -> relu3 -> drop   (feature_dim = hidden)
        fc  = Linear(hidden, num_classes)

    Reference size: 1,663,370 parameters with the defaults (c1 = 32, c2 = 64, hidden = 512).

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        channels: ``(c1, c2)``, filters of the two convolutions.
        hidden: Width of the hidden fully connected layer.
        dropout: Dropout probability on the hidden layer (training mode only).
        input_size: Spatial side of the (square) input, divisible by 4.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 channels: tuple[int, int] = (32, 64), hidden: int = 512, dropout: float = 0.5,
                 input_size: int = 28) -> None:
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        if num_classes < 1 or in_channels < 1 or min(c1, c2, hidden) < 1:
            raise KDConfigError(
                f"MnistCNN: num_classes, in_channels, channels and hidden must be >= 1, got "
                f"{num_classes}, {in_channels}, {channels}, {hidden}.")
        if not 0.0 <= dropout < 1.0:
            raise KDConfigError(f"MnistCNN: dropout must be in [0, 1), got {dropout}.")
        if input_size < 4 or input_size % 4:
            raise KDConfigError(f"MnistCNN: input_size must be a multiple of 4, got {input_size}.")
        self.num_classes, self.in_channels = int(num_classes), int(in_channels)
        self.input_size = int(input_size)
        self.feature_dim: int = int(hidden)
        side = self.input_size // 4
        self.conv1 = nn.Conv2d(self.in_channels, c1, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU(inplace=False)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU(inplace=False)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * side * side, self.feature_dim)
        self.relu3 = nn.ReLU(inplace=False)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.feature_dim, self.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden embedding ``[B, feature_dim]`` (after ReLU and, in training mode, dropout)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.input_size,) * 2:
            raise ValueError(
                f"MnistCNN was built for [B, {self.in_channels}, {self.input_size}, "
                f"{self.input_size}] inputs, got {tuple(x.shape)}; set in_channels / input_size.")
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.drop(self.relu3(self.fc1(torch.flatten(x, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc(self.forward_features(x))
