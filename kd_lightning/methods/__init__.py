"""One LightningModule per distillation method, all on :class:`DistillationModule`.

Every public :class:`DistillationModule` subclass defined in a module of this package is exported
here (found by importing each module), so a new method file needs no edit of this file; a shared
base that is not a method of its own is named with a leading underscore.
"""

import importlib
import inspect
import pkgutil

from kd_lightning.methods.base import DistillationModule
from kd_lightning.methods.wasserstein import NonFiniteGradientError


def _discover() -> dict[str, type]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, DistillationModule) and not name.startswith("_")
                    and obj.__module__ == module.__name__):
                found[name] = obj
    return found


_methods = _discover()
globals().update(_methods)
__all__ = ["NonFiniteGradientError", *sorted(_methods)]
#: the shared bases methods build on: exported, but not methods of their own
BASES = ("DistillationModule", "FeatureDistillation", "TwoStageFeatureDistillation")
#: every method a config or study may name
METHODS = sorted(n for n in _methods if n not in BASES)
