"""Which combinations a bundle holds, and whether the network can be lowered at all."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from mobile_export.config import MAX_AUTO_TASKS
from mobile_export.errors import ExportError
from pam_common.combinations import canonical_combination

if TYPE_CHECKING:
    from merging.network import MultitaskNet


def resolve_combinations(net: MultitaskNet, requested: Iterable[str | Sequence[str]] | None) -> list[tuple[str, ...]]:
    """Canonical, de-duplicated combinations, in request order (all of them when ``None``)."""
    from merging.tasks import all_combinations

    names = net.task_names
    if requested is None:
        if len(names) > MAX_AUTO_TASKS:
            raise ExportError(
                "too_many_combinations",
                f"{len(names)} tasks make {2 ** len(names) - 1} combinations; choose the ones to export "
                f"with --combinations (all are exported automatically up to {MAX_AUTO_TASKS} tasks)",
            )
        return all_combinations(names)
    out: list[tuple[str, ...]] = []
    for c in requested:
        try:
            combo = canonical_combination(c, names, ExportError)
        except ExportError as e:
            raise ExportError(e.code, f"combination {c!r}: {e.message}") from e
        if combo not in out:
            out.append(combo)
    if not out:
        raise ExportError("empty_combination_list", "no combination to export (the list is empty)")
    return out


def parse_combinations(text: str) -> list[str]:
    """``"digit;digit+parity"`` or ``"digit,digit+parity"``: combinations separated by ';' or ',',
    tasks within one joined by '+'."""
    return [p.strip() for p in re.split(r"[;,]", text) if p.strip()]


def check_exportable(net: MultitaskNet) -> None:
    """Zero-width convolutions cannot be lowered; the network must have removed such groups."""
    net.check_wiring()
    for node in net.graph():
        if node.kind == "add" or node.kind == "head":
            continue  # an addition has no conv; heads are checked below
        key, conv = node.key.name, net.conv_of(node.key)
        if conv.in_channels == 0 or conv.out_channels == 0:
            raise ExportError(
                "zero_width", f"block {key} has a zero-width convolution {tuple(conv.weight.shape)}; "
                "remove empty groups with select_channels(layer, set, []) before export",
            )
    for task, head in net.heads.items():
        if head.conv.in_channels == 0:  # type: ignore[union-attr]
            raise ExportError("zero_width", f"head {task} reads no channel")
