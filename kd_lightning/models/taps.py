"""Feature taps: intermediate features of any ``nn.Module``, addressed by module path.

``FeatureTaps(model, ["layer2", "layer3.1.bn2"])`` registers forward hooks on those submodules;
after each forward pass of ``model``, :meth:`FeatureTaps.pop` returns their outputs in the order
given. Works for every network (torchvision models included) without editing it. With
``pre_activation=True`` a tap records the module's *input* instead (a forward pre-hook): tapping a
ReLU module this way gives the pre-ReLU response used by activation-boundary distillation.
A model that nobody taps carries no hooks and pays nothing.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import Tensor, nn

from kd_lightning import KDConfigError


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """``model``'s submodule at dotted ``path``; a clear error listing the nearest names if absent
    (or saying why ``model`` cannot be tapped, for a model whose ``feature_taps_refused`` says so,
    e.g. an :class:`~kd_lightning.models.EnsembleTeacher`)."""
    refused = getattr(model, "feature_taps_refused", None)
    if refused:
        raise KDConfigError(refused)
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [n for n in modules if n]
    near = difflib.get_close_matches(path, names, n=6, cutoff=0.3)
    if not near:  # fall back to the top-level children
        near = [n for n in names if "." not in n][:12]
    raise KDConfigError(
        f"{type(model).__name__} has no module '{path}'. Nearest module names: {', '.join(near)}. "
        f"Use one of the names printed by `[n for n, _ in model.named_modules()]`.")


class FeatureTaps:
    """Forward hooks that record the features of one forward pass.

    Args:
        model: the network to tap.
        layers: module paths, e.g. ``["layer2", "layer3.1.bn2"]``.
        pre_activation: record each module's input instead of its output (one flag for all
            layers, or one per layer).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str],
                 pre_activation: bool | Sequence[bool] = False) -> None:
        self.layers = list(layers)
        flags = ([bool(pre_activation)] * len(self.layers) if isinstance(pre_activation, bool)
                 else [bool(p) for p in pre_activation])
        if len(flags) != len(self.layers):
            raise KDConfigError(f"pre_activation has {len(flags)} entries for {len(self.layers)} layers.")
        self.pre_activation = flags
        self._features: dict[str, Tensor] = {}
        self._handles = []
        for path, pre in zip(self.layers, flags):
            module = resolve_module(model, path)
            if pre:
                hook = module.register_forward_pre_hook(self._make_pre_hook(path))
            else:
                hook = module.register_forward_hook(self._make_hook(path))
            self._handles.append(hook)

    def _make_hook(self, path: str):
        def hook(_module, _inputs, output):
            self._features[path] = output
        return hook

    def _make_pre_hook(self, path: str):
        def hook(_module, inputs):
            self._features[path] = inputs[0]
        return hook

    def pop(self) -> list[Tensor]:
        """Features recorded by the last forward pass, in the order of ``layers``; clears them."""
        missing = [p for p in self.layers if p not in self._features]
        if missing:
            raise RuntimeError(f"no features recorded for {missing}: run a forward pass of the tapped "
                               f"model first (is the module used in its forward?)")
        feats = [self._features[p] for p in self.layers]
        self._features = {}
        return feats

    def remove(self) -> None:
        """Remove every hook; the model is as it was before tapping."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._features = {}

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.layers)
