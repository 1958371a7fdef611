"""What the three layers share and none of them owns: torch-free, pydantic-free, stdlib only.

``merging/``, ``mobile_export/`` and ``service/`` all import this package; it imports none of them,
so the service (like a phone) can use it without pulling in torch or the merging code.
"""

from __future__ import annotations

from pam_common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from pam_common.combinations import (
    COMBINATION_SEPARATOR,
    canonical_combination,
    combination_name,
    split_combination,
)
from pam_common.errors import CodedError

__all__ = [
    "COMBINATION_SEPARATOR",
    "CodedError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "canonical_combination",
    "combination_name",
    "split_combination",
]
