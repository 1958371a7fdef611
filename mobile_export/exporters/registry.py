"""Exporters by name: :func:`register_exporter` adds one, :func:`get_exporter` builds it.

Every module of ``mobile_export/exporters/`` is imported the first time a name is looked up, so a
new format is one new file there with a registered :class:`~mobile_export.exporters.base.Exporter`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from mobile_export.errors import ExportError
from mobile_export.exporters.base import Exporter

E = TypeVar("E", bound=type[Exporter])

_REGISTRY: dict[str, type[Exporter]] = {}
_DISCOVERED = False


def register_exporter(cls: E) -> E:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name or not getattr(cls, "suffix", "").startswith("."):
        raise TypeError(f"{cls.__name__} needs a name and a suffix starting with '.'")
    known = _REGISTRY.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise TypeError(f"exporter {name!r} is already registered by {known.__module__}.{known.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    package = importlib.import_module("mobile_export.exporters")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"mobile_export.exporters.{info.name}")
    _DISCOVERED = True


def exporter_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_exporter(name: str) -> Exporter:
    _discover()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ExportError("unknown_exporter", f"no exporter {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return cls()
