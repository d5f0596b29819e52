"""CIFAR-style ResNets (depth 6n+2), as used by the CRD / RepDistiller benchmarks.

References:
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (Section 4.2,
    the CIFAR-10 architecture with three stages of 16/32/64 filters);
    Tian et al., "Contrastive Representation Distillation", ICLR 2020 (the RepDistiller
    code base, which adds the wider ``x4`` variants with 32/64/128/256 filters).

Module paths (for forward hooks)::

    conv1, bn1, relu                      stem
    layer1, layer2, layer3                stages (strides 1, 2, 2), Sequential of BasicBlock
    layerK.i.conv1 / bn1 / relu1          first conv of block i
    layerK.i.conv2 / bn2                  second conv of block i (residual branch output)
    layerK.i.downsample                   1x1 conv + BN shortcut (only when the shape changes)
    layerK.i.relu                         ReLU applied after the residual addition
    avgpool, fc                           global average pool, classifier

The pre-activation output of a block (``bn2(...) + shortcut``, the feature used by
Activation-Boundary distillation) is the *input* of ``layerK.i.relu``: capture it
with a forward pre-hook on that module. All ReLUs are separate, non in-place
modules, so captured tensors are never overwritten.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning import KDConfigError

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
]

_FILTERS = [16, 16, 32, 64]
_FILTERS_X4 = [32, 64, 128, 256]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Residual block conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) followed by ReLU.

    He et al., CVPR 2016. The shortcut is the identity, or a 1x1 conv + BN
    (``downsample``) when the stride or the channel count changes.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``depth = 6n + 2`` (He et al., CVPR 2016, Sec. 4.2).

    This is the ``ResNet`` of the CRD / RepDistiller benchmark (Tian et al., ICLR 2020):
    a 3x3 stem with ``num_filters[0]`` channels, three stages ``layer1``-``layer3`` of
    ``n`` BasicBlocks with ``num_filters[1:]`` channels and strides 1, 2, 2, global
    average pooling and a linear ``fc``. Convs use Kaiming-normal (fan_out) init,
    BN weights 1 and biases 0.

    Reference sizes with ``num_classes=100``: resnet20 0.28M, resnet56 0.86M,
    resnet110 1.74M, resnet8x4 1.23M, resnet32x4 7.43M parameters.

    Args:
        depth: Network depth, must be ``6n + 2`` (8, 14, 20, 32, 44, 56, 110, ...).
        num_filters: Four channel counts: stem, layer1, layer2, layer3.
        num_classes: Number of output logits.
        in_channels: Number of input channels.
    """

    def __init__(
        self,
        depth: int = 20,
        num_filters: list[int] = [16, 16, 32, 64],  # noqa: B006 - copied, never mutated
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        filters = [int(f) for f in num_filters]
        if depth < 8 or (depth - 2) % 6 != 0:
            raise KDConfigError(
                f"CifarResNet: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                f"got {depth}."
            )
        if len(filters) != 4 or any(f < 1 for f in filters):
            raise KDConfigError(
                f"CifarResNet: num_filters must be 4 positive ints (stem, layer1-3), got {num_filters}."
            )
        if num_classes < 1 or in_channels < 1:
            raise KDConfigError(
                f"CifarResNet: num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}."
            )
        n = (depth - 2) // 6
        self.depth = int(depth)
        self.num_filters = filters
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)

        self._in_planes = filters[0]
        self.conv1 = _conv3x3(self.in_channels, filters[0])
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = self._make_layer(filters[1], n, stride=1)
        self.layer2 = self._make_layer(filters[2], n, stride=2)
        self.layer3 = self._make_layer(filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = filters[3] * BasicBlock.expansion
        self.fc = nn.Linear(self.feature_dim, self.num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(BasicBlock(self._in_planes, planes, stride if i == 0 else 1))
            self._in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled ``layer3`` output ``[B, feature_dim]``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc(self.forward_features(x))


class resnet8(CifarResNet):  # noqa: N801 - the name researchers use
    """ResNet-8 for CIFAR (He et al. 2016; CRD/RepDistiller): depth 8, filters 16/16/32/64.

    Reference size: 0.08M parameters with 100 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=8, num_filters=_FILTERS, num_classes=num_classes, in_channels=in_channels)


class resnet14(CifarResNet):  # noqa: N801
    """ResNet-14 for CIFAR (He et al. 2016; CRD/RepDistiller): depth 14, filters 16/16/32/64.

    Reference size: 0.18M parameters with 100 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=14, num_filters=_FILTERS, num_classes=num_classes, in_channels=in_channels)


class resnet20(CifarResNet):  # noqa: N801
    """ResNet-20 for CIFAR (He et al. 2016; CRD/RepDistiller): depth 20, filters 16/16/32/64.

    Reference size: 0.28M parameters with 100 classes (0.27M with 10).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=20, num_filters=_FILTERS, num_classes=num_classes, in_channels=in_channels)


class resnet32(CifarResNet):  # noqa: N801
    """ResNet-32 for CIFAR (He et al. 2016; CRD/RepDistiller): depth 32, filters 16/16/32/64.

    Reference size: 0.47M parameters with 100 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=32, num_filters=_FILTERS, num_classes=num_classes, in_channels=in_channels)


class resnet44(CifarResNet):  # noqa: N801
    """ResNet-44 for CIFAR (He et al. 2016; CRD/RepDistiller): depth 44, filters 16/16/32/64.

    Reference size: 0.67M parameters with 100 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=44, num_filters=_FILTERS, num_classes=num_classes, in_channels=in_channels)


class resnet56(CifarResNet):  # noqa: N801
    """ResNet-56 for CIFAR (He et al. 2016; CRD/RepDistiller): depth 56, filters 16/16/32/64.

    Reference size: 0.86M parameters with 100 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=56, num_filters=_FILTERS, num_classes=num_classes, in_channels=in_channels)


class resnet110(CifarResNet):  # noqa: N801
    """ResNet-110 for CIFAR (He et al. 2016; CRD/RepDistiller): depth 110, filters 16/16/32/64.

    Reference size: 1.74M parameters with 100 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=110, num_filters=_FILTERS, num_classes=num_classes, in_channels=in_channels)


class resnet8x4(CifarResNet):  # noqa: N801
    """ResNet-8x4 (CRD/RepDistiller, Tian et al. 2020): depth 8, filters 32/64/128/256.

    Reference size: 1.23M parameters with 100 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=8, num_filters=_FILTERS_X4, num_classes=num_classes, in_channels=in_channels)


class resnet32x4(CifarResNet):  # noqa: N801
    """ResNet-32x4 (CRD/RepDistiller, Tian et al. 2020): depth 32, filters 32/64/128/256.

    Reference size: 7.43M parameters with 100 classes.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__(depth=32, num_filters=_FILTERS_X4, num_classes=num_classes, in_channels=in_channels)
