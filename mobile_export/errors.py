"""User-facing errors of the export layer (bad bundles, manifests, requests for unknown methods)."""

from __future__ import annotations

from pam_common.errors import CodedError


class ExportError(CodedError):
    """A problem with the caller's input or files, with a stable machine-readable ``code``."""
