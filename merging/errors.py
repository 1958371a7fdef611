"""User-facing errors of the merging layer.

One exception type for everything a user can get wrong (bad task names, mismatched networks,
corrupt checkpoints, malformed data files); internal invariants use :func:`invariant` instead,
so a traceback from it always means a bug in this package, never in the caller's input.
"""

from __future__ import annotations

from pam_common.errors import CodedError


class MergingError(CodedError):
    """A problem with the caller's input, with a stable machine-readable ``code``."""


def invariant(condition: bool, message: str) -> None:
    """Assert an internal invariant (a bug if it fails, not a user error)."""
    if not condition:
        raise AssertionError(f"internal invariant violated: {message}")
