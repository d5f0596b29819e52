"""Any timm model by name, as a teacher or a student (optional: ``pip install kd_lightning[timm]``)."""

from __future__ import annotations

import difflib
from typing import Any

from torch import Tensor, nn

from kd_lightning import KDConfigError


def import_timm():
    """The ``timm`` module, or a :class:`KDConfigError` saying how to install it."""
    try:
        import timm
    except ImportError:
        raise KDConfigError(
            "TimmModel needs the timm package, which is not installed. Install it with "
            "`pip install kd_lightning[timm]` (or `pip install timm`).") from None
    return timm


class TimmModel(nn.Module):
    """``timm.create_model(name, pretrained, num_classes=..., in_chans=..., **kwargs)`` behind a
    class path::

        student:
          class_path: kd_lightning.models.TimmModel
          init_args: {name: resnet18, num_classes: 100}

    The wrapped network is ``self.model``: feature taps address its modules with a ``model.``
    prefix (``model.layer2``, ``model.stages.1``, ``model.blocks.5``; print
    ``[n for n, _ in TimmModel(...).named_modules()]`` for the names of one model).

    Args:
        name: a name of ``timm.list_models()``.
        pretrained: load timm's pretrained weights (from the Hugging Face hub cache, downloaded on
            first use when there is a network). timm adapts the classifier to ``num_classes`` and
            the stem to ``in_channels``.
        num_classes: number of output logits.
        in_channels: number of input channels.
        kwargs: further keyword arguments of ``timm.create_model`` (``drop_rate``, ...).
    """

    def __init__(self, name: str = "resnet18", pretrained: bool = False, num_classes: int = 10,
                 in_channels: int = 3, kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        timm = import_timm()
        if not timm.is_model(name):
            near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            raise KDConfigError(
                f"TimmModel: unknown timm model '{name}'"
                f"{' (close matches: ' + ', '.join(near) + ')' if near else ''}; the names are "
                f"those of timm.list_models(), e.g. timm.list_models('*{name[:4]}*').")
        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes,
                                           in_chans=in_channels, **(kwargs or {}))
        except (OSError, RuntimeError) as err:
            if not pretrained:
                raise
            raise KDConfigError(
                f"TimmModel: the pretrained weights of '{name}' could not be loaded "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). They are read from the "
                f"Hugging Face hub cache (HF_HOME), where timm downloads them on first use; without "
                f"a network, fill that cache on a machine with one, or use pretrained: false.") from None
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
