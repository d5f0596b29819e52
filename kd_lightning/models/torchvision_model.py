"""Any torchvision classifier by name, as a teacher or a student."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class TorchvisionModel(nn.Module):
    """``torchvision.models.get_model(name, num_classes=..., **kwargs)`` behind a class path.

    torchvision's model *classes* (``torchvision.models.MobileNetV2``, ``torchvision.models.ResNet``
    with ``block``/``layers``, ...) work directly as ``class_path``; its builder *functions*
    (``resnet18``, ``vgg11``, ...) are reached through this wrapper::

        student:
          class_path: kd_lightning.models.TorchvisionModel
          init_args: {name: resnet18, num_classes: 10}

    The wrapped network is ``self.model``, so feature taps address ``model.layer2`` etc.
    No weights are downloaded: pretrained weights need a network and ``weights`` set explicitly.
    """

    def __init__(self, name: str = "resnet18", num_classes: int = 10, weights: str | None = None,
                 kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        from torchvision.models import get_model, list_models

        if name not in list_models():
            raise ValueError(f"unknown torchvision model '{name}'; see torchvision.models.list_models()")
        self.model = get_model(name, weights=weights, num_classes=num_classes, **(kwargs or {}))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
