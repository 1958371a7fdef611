"""User-facing errors of the export layer (bad bundles, manifests, requests for unknown methods)."""

from __future__ import annotations


class ExportError(Exception):
    """A problem with the caller's input or files, with a stable machine-readable ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"
