"""Which combinations an app really asks for: request counts from the service, or a plain list.

``pam export --combinations-from FILE`` reads any of

- the service's Prometheus text (``GET /metrics``): ``pam_requests_total{combination="a+b",status="200"} 12``
  (summed over statuses; the ``none`` label, requests refused before a combination was known, is
  skipped; a 404 for a combination that was not exported is demand too);
- the service's JSON log lines (``pam serve --log-format json``): one object per line with
  ``"msg": "request"`` and ``"combination": "a+b"``; each line counts one request;
- a plain list, one combination per line (``digit+parity`` or ``digit,parity``), optionally
  followed by a count (``digit+parity 120``); a line without a count counts once, so a list of
  requests counts itself; ``#`` starts a comment.

``--max-methods K`` keeps the K most-requested combinations (ties: first seen first) and adds
every single task, so any request can still be answered by a superset method.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from mobile_export.errors import ExportError

REQUEST_COUNTER = "pam_requests_total"  # service/metrics.py
NO_COMBINATION = "none"  # service/metrics.py: label of requests refused before a combination was known
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _canonical_text(text: str) -> str:
    """``digit,parity`` and ``parity+digit`` to one key: sorted names joined by ``+``."""
    parts = [p.strip() for p in re.split(r"[+,]", text) if p.strip()]
    return "+".join(sorted(set(parts)))


def read_counts(path: str | Path) -> tuple[dict[str, float], str]:
    """(combination -> request count, format name). Combinations are canonical text (sorted
    names joined by ``+``), not yet checked against a model's tasks."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError("bad_combinations_file", f"cannot read {p}: {e}") from e
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    counts: dict[str, float] = {}

    def add(combo: str, n: float) -> None:
        key = _canonical_text(combo)
        if key and key != NO_COMBINATION:
            counts[key] = counts.get(key, 0.0) + n

    if any(ln.startswith(REQUEST_COUNTER) for ln in lines):
        for ln in lines:
            m = _SAMPLE.match(ln)
            if not m or m["name"] != REQUEST_COUNTER:
                continue  # comments, other metrics, pam_requests_created
            labels = dict(_LABEL.findall(m["labels"] or ""))
            if "combination" in labels:
                add(labels["combination"], float(m["value"]))
        fmt = "prometheus"
    elif any(ln.startswith("{") for ln in lines):
        for ln in lines:
            if not ln.startswith("{"):
                continue  # plain-text lines interleaved in a log
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            combo = rec.get("combination") if isinstance(rec, dict) else None
            if isinstance(combo, str) and rec.get("msg", "request") == "request":
                add(combo, 1.0)
        fmt = "json log"
    else:
        for ln in lines:
            ln = ln.split("#", 1)[0].strip()
            if not ln:
                continue
            parts = ln.split()
            n = 1.0
            if len(parts) > 1:
                try:
                    n = float(parts[-1])
                    parts = parts[:-1]
                except ValueError:
                    pass
            add(",".join(parts), n)
        fmt = "list"
    if not counts:
        raise ExportError("empty_combination_list", f"{p} names no combination (read as {fmt})")
    return counts, fmt


def most_requested(
    counts: dict[str, float], task_names: Sequence[str], max_methods: int | None
) -> list[str]:
    """The combinations to export: all of ``counts`` (most requested first), or the
    ``max_methods`` most requested plus every single task."""
    ranked = sorted(counts, key=lambda c: -counts[c])  # stable: ties keep first-seen order
    if max_methods is None:
        return ranked
    if max_methods < 0:
        raise ExportError("bad_max_methods", f"--max-methods must be >= 0, got {max_methods}")
    chosen = ranked[:max_methods]
    return chosen + [t for t in sorted(task_names) if t not in chosen]


def select_combinations(
    path: str | Path, task_names: Sequence[str], max_methods: int | None = None
) -> tuple[list[str], str, dict[str, float]]:
    """(combinations to export in canonical order, file format, request counts) for a model with
    ``task_names``; a requested task the model lacks is an ``unknown_task`` error."""
    from merging.tasks import all_combinations

    counts, fmt = read_counts(path)
    unknown = sorted({t for c in counts for t in c.split("+")} - set(task_names))
    if unknown:
        raise ExportError("unknown_task", f"{path} asks for unknown task(s) {', '.join(unknown)}; "
                          f"the model's tasks: {', '.join(task_names)}")
    chosen = set(most_requested(counts, task_names, max_methods))
    ordered = ["+".join(c) for c in all_combinations(task_names) if "+".join(c) in chosen]
    return ordered, fmt, counts
