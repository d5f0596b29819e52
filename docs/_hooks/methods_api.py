"""MkDocs hook: the methods page lists every exported method, read from the package at build time.

``docs/methods.md`` holds the marker ``<!-- methods-api -->``; this hook replaces it with one
mkdocstrings entry per module that defines a class of ``kd_lightning.methods.__all__`` which is a
``DistillationModule`` (the base class first): the module's docstring, which names the paper, then
its exported classes; written with the defining module so that the entry resolves however
``__all__`` is built. A method added to the package therefore appears here with nothing to edit.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# the repository this site documents, ahead of any installed copy of the package
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MARKER = "<!-- methods-api -->"


def exported_methods() -> list[type]:
    """Every exported ``DistillationModule`` subclass of ``kd_lightning.methods``, base first."""
    methods = importlib.import_module("kd_lightning.methods")
    base = methods.DistillationModule
    found = []
    for name in methods.__all__:
        obj = getattr(methods, name)
        if isinstance(obj, type) and issubclass(obj, base) and obj not in found:
            found.append(obj)
    found.sort(key=lambda cls: cls is not base)   # stable: __all__ order after the base
    return found


def api_entries() -> str:
    """One entry per defining module: its docstring (the paper and formula) and its exported
    method classes, in ``__all__`` order."""
    modules: dict[str, list[str]] = {}
    for cls in exported_methods():
        modules.setdefault(cls.__module__, []).append(cls.__qualname__)
    return "\n\n".join(f"::: {module}\n    options:\n      show_root_heading: false\n"
                       f"      members: [{', '.join(names)}]" for module, names in modules.items())


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, api_entries())
    return markdown
