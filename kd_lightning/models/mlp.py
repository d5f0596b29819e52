"""Fully connected classifier (the MNIST-1D reference MLP)."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning import KDConfigError

__all__ = ["MLP"]


class MLP(nn.Module):
    """Multi-layer perceptron with ReLU hidden layers.

    Reference: the MLP baseline of MNIST-1D (Greydanus & Kobak, "Scaling Down Deep
    Learning with MNIST-1D", ICML 2024), 40-100-100-10 with ReLU, 15,210 parameters
    with the default arguments.

    The input is flattened from dimension 1 on, so ``[B, L]``, ``[B, C, L]`` and
    images ``[B, C, H, W]`` are all accepted as long as the flattened size equals
    ``input_dim``.

    Module paths (for forward hooks): hidden layers ``fc1``, ``fc2``, ... each
    followed by its own ``relu1``, ``relu2``, ... (not in-place), then, with
    ``dropout > 0``, ``drop1``, ``drop2``, ...; classifier ``fc``.

    Args:
        input_dim: Flattened input size (already including channels, e.g. 784 for
            1x28x28 MNIST, 3072 for 3x32x32 CIFAR).
        hidden_dims: Widths of the hidden layers; an empty list gives a linear
            (logistic regression) model.
        num_classes: Number of output logits.
        in_channels: Number of input channels. Accepted so that every model in the
            zoo shares the same data-related arguments; it does not change the
            architecture because ``input_dim`` is already the flattened size.
            It must divide ``input_dim``.
        dropout: drop probability of an ``nn.Dropout`` after every hidden ReLU (default 0:
            no dropout layers, the reference MLP). Dropout before each weight layer is the
            network Gal & Ghahramani read as a Bayesian approximation (MC dropout).
    """

    def __init__(
        self,
        input_dim: int = 40,
        hidden_dims: list[int] = [100, 100],  # noqa: B006 - copied, never mutated
        num_classes: int = 10,
        in_channels: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden_dims]
        if input_dim < 1:
            raise KDConfigError(f"MLP: input_dim must be >= 1, got {input_dim}.")
        if num_classes < 1:
            raise KDConfigError(f"MLP: num_classes must be >= 1, got {num_classes}.")
        if in_channels < 1 or input_dim % in_channels != 0:
            raise KDConfigError(
                f"MLP: in_channels={in_channels} must be >= 1 and divide input_dim={input_dim} "
                "(input_dim is the flattened input size, channels included)."
            )
        if not 0.0 <= dropout < 1.0:
            raise KDConfigError(f"MLP: dropout must be in [0, 1), got {dropout}.")
        if any(h < 1 for h in hidden):
            raise KDConfigError(f"MLP: every hidden dim must be >= 1, got {hidden}.")

        self.input_dim = int(input_dim)
        self.hidden_dims = hidden
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.dropout = float(dropout)

        prev = self.input_dim
        for i, width in enumerate(hidden, start=1):
            self.add_module(f"fc{i}", nn.Linear(prev, width))
            self.add_module(f"relu{i}", nn.ReLU(inplace=False))
            if dropout > 0:
                self.add_module(f"drop{i}", nn.Dropout(dropout))
            prev = width
        self.feature_dim: int = prev
        self.fc = nn.Linear(prev, self.num_classes)

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"MLP expects a batched input [B, ...], got shape {tuple(x.shape)}.")
        x = torch.flatten(x, 1)
        if x.shape[1] != self.input_dim:
            raise ValueError(
                f"MLP was built with input_dim={self.input_dim} but the flattened input has "
                f"{x.shape[1]} features (input shape {tuple(x.shape)}); set input_dim accordingly."
            )
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding ``[B, feature_dim]`` (output of the last hidden ReLU, after its
        dropout when ``dropout > 0``)."""
        x = self._flatten(x)
        for i in range(1, len(self.hidden_dims) + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
            if self.dropout > 0:
                x = getattr(self, f"drop{i}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc(self.forward_features(x))
