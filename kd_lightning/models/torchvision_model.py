"""Any torchvision classifier by name, as a teacher or a student, with pretrained weights by name."""

from __future__ import annotations

import difflib
import os
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor, nn

from kd_lightning import KDConfigError


def resolve_torchvision_weights(name: str, weights: str):
    """The ``torchvision.models.WeightsEnum`` member ``weights`` names for model ``name``.

    ``weights`` is ``"DEFAULT"``, a member name of the model's weights enum (``"IMAGENET1K_V1"``) or
    its full name (``"ResNet18_Weights.IMAGENET1K_V1"``). Raises :class:`KDConfigError` listing
    the available weights otherwise.
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    available = ["DEFAULT", *(f"{enum.__name__}.{w.name}" for w in enum)]
    member = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
    if "." not in member:
        try:
            return enum[member] if member != "DEFAULT" else enum.DEFAULT
        except KeyError:
            pass
    raise KDConfigError(
        f"TorchvisionModel: unknown weights '{weights}' for torchvision model '{name}'. Available: "
        f"{', '.join(available)}.")


def hub_cache_path(weights) -> str:
    """Where ``torch.hub`` keeps (or would download) the file of a torchvision weights member."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


class TorchvisionModel(nn.Module):
    """``torchvision.models.get_model(name, weights=..., num_classes=..., **kwargs)`` behind a class path.

    torchvision's model *classes* (``torchvision.models.MobileNetV2``, ``torchvision.models.ResNet``
    with ``block``/``layers``, ...) work directly as ``class_path``; its builder *functions*
    (``resnet18``, ``vgg11``, ...) are reached through this wrapper::

        student:
          class_path: kd_lightning.models.TorchvisionModel
          init_args: {name: resnet18, num_classes: 10}

    The wrapped network is ``self.model``, so feature taps address ``model.layer2`` etc.

    Args:
        name: a name of ``torchvision.models.list_models()``.
        num_classes: number of output logits.
        weights: pretrained weights by name: ``"DEFAULT"``, ``"IMAGENET1K_V1"`` or
            ``"ResNet18_Weights.IMAGENET1K_V1"``; ``None`` (default) for random initialisation.
            The file is read from the torch hub cache (``$TORCH_HOME/hub/checkpoints``), where
            torchvision downloads it on first use; without a network, copy it there (the error
            names the URL and the path).
        replace_head: with ``weights`` trained for another number of classes (ImageNet: 1000),
            replace the last ``nn.Linear`` (the classifier) by a freshly initialised one with
            ``num_classes`` outputs: fine-tuning a pretrained student. A teacher needs the class
            count of its weights, so this is off by default and a mismatch is an error.
        kwargs: further keyword arguments of the torchvision builder.
    """

    def __init__(self, name: str = "resnet18", num_classes: int = 10, weights: str | None = None,
                 replace_head: bool = False, kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        from torchvision.models import get_model, list_models

        if name not in list_models():
            near = difflib.get_close_matches(name, list_models(), n=5, cutoff=0.5)
            raise KDConfigError(
                f"TorchvisionModel: unknown torchvision model '{name}'"
                f"{' (close matches: ' + ', '.join(near) + ')' if near else ''}; the names are "
                f"those of torchvision.models.list_models().")
        kwargs = dict(kwargs or {})
        if weights is None:
            self.model = get_model(name, weights=None, num_classes=num_classes, **kwargs)
            return
        member = resolve_torchvision_weights(name, weights)
        trained_for = len(member.meta.get("categories") or []) or None
        if trained_for is not None and trained_for != num_classes and not replace_head:
            raise KDConfigError(
                f"TorchvisionModel: weights {member} were trained for {trained_for} classes but "
                f"num_classes={num_classes}. Use the data set's class count, or set "
                f"replace_head: true to fine-tune a student with a new classifier.")
        path = hub_cache_path(member)
        try:
            self.model = get_model(name, weights=member, **kwargs)
        except (URLError, OSError) as err:
            raise KDConfigError(
                f"TorchvisionModel: the weights file of {member} is not in the torch hub cache "
                f"({path}) and could not be downloaded ({type(err).__name__}: {err}). On a machine "
                f"with a network, download {member.url} and copy it to {path} (or set TORCH_HOME "
                f"to a folder whose hub/checkpoints holds it).") from None
        if trained_for is not None and trained_for != num_classes:
            self._replace_head(num_classes)

    def _replace_head(self, num_classes: int) -> None:
        """Swap the last ``nn.Linear`` of ``self.model`` for a new one with ``num_classes`` outputs."""
        linear = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise KDConfigError(f"TorchvisionModel: {type(self.model).__name__} has no nn.Linear "
                                f"classifier to replace; use num_classes of the weights.")
        path, old = linear[-1]
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
