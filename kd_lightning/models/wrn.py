"""Wide Residual Networks (depth 6n+4) for 32x32 inputs.

References:
    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016;
    Tian et al., "Contrastive Representation Distillation", ICLR 2020 (the
    WRN-40-2 / WRN-16-2 / WRN-40-1 / WRN-16-1 teacher/student pairs of RepDistiller).

Module paths (for forward hooks)::

    conv1                                    stem 3x3 conv, 16 channels
    layer1, layer2, layer3                   stages (strides 1, 2, 2), Sequential of WideBasicBlock
    layerK.i.bn1 / relu1 / conv1             pre-activation and first conv of block i
    layerK.i.bn2 / relu2 / dropout / conv2   second half of block i
    layerK.i.downsample                      1x1 conv shortcut (only when the shape changes)
    bn, relu                                 final BN + ReLU
    avgpool, fc                              global average pool, classifier

Because the blocks are pre-activation, the pre-ReLU feature after stage K is the
output of ``layer{K+1}.0.bn1`` (K = 1, 2) and of ``bn`` after ``layer3``.
"""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning import KDConfigError

__all__ = ["WideBasicBlock", "WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut.

    Zagoruyko & Komodakis, BMVC 2016. When the channel count changes, the
    pre-activated input feeds both the residual branch and a 1x1 conv shortcut
    (``downsample``); otherwise the raw input is added back (identity shortcut).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.downsample: nn.Module | None = None
        if not self.equal_in_out:
            self.downsample = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        shortcut = x if self.downsample is None else self.downsample(pre)
        return out + shortcut


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis, BMVC 2016).

    ``depth = 6n + 4``; the three stages have ``16k``, ``32k``, ``64k`` channels
    (``k = widen_factor``) after a 16-channel stem, with ``n`` pre-activation blocks
    each, followed by BN, ReLU, global average pooling and ``fc``. Same layout and
    initialisation (Kaiming-normal fan_out convs, BN 1/0, zero linear bias) as the
    CRD / RepDistiller ``wrn`` (Tian et al., ICLR 2020).

    Reference sizes with ``num_classes=100``: WRN-16-1 0.18M, WRN-16-2 0.70M,
    WRN-40-1 0.57M, WRN-40-2 2.26M parameters.

    Args:
        depth: Network depth, must be ``6n + 4`` (10, 16, 22, 28, 40, ...).
        widen_factor: Channel multiplier ``k``.
        num_classes: Number of output logits.
        in_channels: Number of input channels.
        dropout: Dropout probability between the two convs of each block.
    """

    def __init__(
        self,
        depth: int = 16,
        widen_factor: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise KDConfigError(
                f"WideResNet: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}."
            )
        if widen_factor < 1 or num_classes < 1 or in_channels < 1:
            raise KDConfigError(
                f"WideResNet: widen_factor, num_classes and in_channels must be >= 1, got "
                f"{widen_factor}, {num_classes}, {in_channels}."
            )
        if not 0.0 <= dropout < 1.0:
            raise KDConfigError(f"WideResNet: dropout must be in [0, 1), got {dropout}.")
        n = (depth - 4) // 6
        k = int(widen_factor)
        channels = [16, 16 * k, 32 * k, 64 * k]
        self.depth = int(depth)
        self.widen_factor = k
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.dropout_rate = float(dropout)

        self.conv1 = nn.Conv2d(self.in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(channels[0], channels[1], n, stride=1)
        self.layer2 = self._make_layer(channels[1], channels[2], n, stride=2)
        self.layer3 = self._make_layer(channels[2], channels[3], n, stride=2)
        self.bn = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim: int = channels[3]
        self.fc = nn.Linear(self.feature_dim, self.num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _make_layer(self, in_planes: int, out_planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            first = i == 0
            layers.append(
                WideBasicBlock(
                    in_planes if first else out_planes, out_planes, stride if first else 1, self.dropout_rate
                )
            )
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled post-ReLU features ``[B, feature_dim]``."""
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.relu(self.bn(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.fc(self.forward_features(x))


class wrn_16_1(WideResNet):  # noqa: N801 - the name researchers use
    """WRN-16-1 (Zagoruyko & Komodakis 2016; CRD/RepDistiller student). 0.18M params (100 classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__(
            depth=16, widen_factor=1, num_classes=num_classes, in_channels=in_channels, dropout=dropout
        )


class wrn_16_2(WideResNet):  # noqa: N801
    """WRN-16-2 (Zagoruyko & Komodakis 2016; CRD/RepDistiller student). 0.70M params (100 classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__(
            depth=16, widen_factor=2, num_classes=num_classes, in_channels=in_channels, dropout=dropout
        )


class wrn_40_1(WideResNet):  # noqa: N801
    """WRN-40-1 (Zagoruyko & Komodakis 2016; CRD/RepDistiller student). 0.57M params (100 classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__(
            depth=40, widen_factor=1, num_classes=num_classes, in_channels=in_channels, dropout=dropout
        )


class wrn_40_2(WideResNet):  # noqa: N801
    """WRN-40-2 (Zagoruyko & Komodakis 2016; CRD/RepDistiller teacher). 2.26M params (100 classes)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__(
            depth=40, widen_factor=2, num_classes=num_classes, in_channels=in_channels, dropout=dropout
        )
