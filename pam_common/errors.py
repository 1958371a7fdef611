"""The base of every user-facing error in the project: a stable machine-readable ``code`` and a message.

Each layer keeps its own subclass (``MergingError``, ``ExportError``, ``ServiceError``) so callers
can tell where a problem was found; the shape (``.code``, ``.message``, ``str`` = ``[code] message``)
is defined once here.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[CodedError], state: dict[str, Any]) -> CodedError:
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message", ""))
    err.__dict__.update(state)
    return err


class CodedError(Exception):
    """A problem with the caller's input, files or request, with a stable ``code`` (``snake_case``)."""

    code: str
    message: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)  # args stays (message,), as before the base existed
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take different constructor arguments (ServiceError has a status first), so the
        # default reduce (``cls(*args)``) cannot rebuild them; errors must cross process pools intact.
        return _rebuild, (type(self), dict(self.__dict__))
