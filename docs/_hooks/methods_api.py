"""MkDocs hook: the methods page lists every exported method, read from the package at build time.

``docs/methods.md`` holds the marker ``<!-- methods-api -->``; this hook replaces it with one
mkdocstrings entry per class in ``kd_lightning.methods.__all__`` that is a ``DistillationModule``
(the base class first), written with the class's defining module so that the entry resolves however
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
    return "\n\n".join(f"::: {cls.__module__}.{cls.__qualname__}" for cls in exported_methods())


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, api_entries())
    return markdown
