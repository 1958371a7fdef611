"""One small name -> factory registry, shared by architectures, data sets and mergers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from merging.errors import MergingError

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """Factories by name; an unknown name is a ``MergingError("unknown_<kind>")`` listing the known ones."""

    def __init__(self, kind: str, label: str) -> None:
        self.kind = kind  # used in the error code, e.g. "merger"
        self.label = label  # used in the message, e.g. "merger"
        self._items: dict[str, F] = {}

    def add(self, name: str, factory: F) -> F:
        self._items[name] = factory
        return factory

    def register(self, name: str) -> Callable[[F], F]:
        return lambda factory: self.add(name, factory)

    def names(self) -> list[str]:
        return list(self._items)

    def get(self, name: str) -> F:
        if name not in self._items:
            known = ", ".join(self.names())
            raise MergingError(f"unknown_{self.kind}", f"unknown {self.label} {name!r}; known: {known}")
        return self._items[name]
