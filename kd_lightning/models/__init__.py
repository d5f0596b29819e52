"""Model zoo: MNIST-1D MLP/CNN, LeNet-5, an MNIST CNN teacher, CIFAR ResNets and Wide ResNets;
torchvision and timm models by name (``TorchvisionModel``, ``TimmModel``).

Every model takes ``num_classes`` (and ``in_channels``) as keyword arguments, returns
logits ``[B, num_classes]``, exposes ``feature_dim`` and ``forward_features(x)`` with
``forward(x) == fc(forward_features(x))``.
"""

from kd_lightning.models.cnn1d import ConvNet1D
from kd_lightning.models.ensemble import EnsembleTeacher
from kd_lightning.models.lenet import LeNet5, LeNet5Half, lenet5_half
from kd_lightning.models.mlp import MLP
from kd_lightning.models.mnist_cnn import MnistCNN
from kd_lightning.models.resnet_cifar import (
    BasicBlock,
    CifarResNet,
    resnet8,
    resnet8x4,
    resnet14,
    resnet20,
    resnet32,
    resnet32x4,
    resnet44,
    resnet56,
    resnet110,
)
from kd_lightning.models.taps import FeatureTaps, resolve_module
from kd_lightning.models.timm_model import TimmModel
from kd_lightning.models.torchvision_model import TorchvisionModel
from kd_lightning.models.wrn import WideBasicBlock, WideResNet, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = [
    "MLP",
    "MnistCNN",
    "ConvNet1D",
    "EnsembleTeacher",
    "LeNet5",
    "LeNet5Half",
    "lenet5_half",
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
    "WideBasicBlock",
    "WideResNet",
    "wrn_16_1",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
    "TorchvisionModel",
    "TimmModel",
    "FeatureTaps",
    "resolve_module",
]

from kd_lightning.models.connectors import ConvConnector, LinearConnector, build_connector

__all__ += ["ConvConnector", "LinearConnector", "build_connector"]
