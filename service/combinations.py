"""Requested tasks -> the method that answers them: the exact combination's method, or (unless strict)
the cheapest exported superset, whose extra outputs the response drops.

Query rule (one, documented in docs/service.md): ``tasks`` may be repeated and each value may list
tasks separated by commas, spaces or ``+`` (a literal ``+`` in a query string arrives as a space),
so ``tasks=digit,parity``, ``tasks=digit&tasks=parity`` and ``tasks=digit+parity`` are the same
combination.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mobile_export.errors import ExportError
from mobile_export.manifest import Manifest, MethodEntry
from pam_common.combinations import combination_name, split_combination
from service.errors import ServiceError

_CLIENT_CODES = {"unknown_task": 400, "empty_combination": 400, "combination_not_exported": 404}
MAX_TASK_VALUES = 64  # repeated ``tasks`` values (and tasks named) per request; more is a 400


@dataclass(frozen=True)
class Resolved:
    """What runs for a request: ``tasks`` (canonical, sorted) answered by ``method``."""

    combination: str  # the canonical requested combination, e.g. "digit+parity"
    tasks: list[str]
    method: MethodEntry  # the method that runs: exact, or the cheapest exported superset

    @property
    def superset(self) -> bool:
        return self.method.name != self.combination


def split_tasks(values: Iterable[str] | str | None) -> list[str] | None:
    """Query values -> task names (``None``: the parameter was absent, meaning all tasks)."""
    if values is None:
        return None
    vals = [values] if isinstance(values, str) else list(values)
    if len(vals) > MAX_TASK_VALUES:
        raise ServiceError(400, "too_many_tasks", f"{len(vals)} 'tasks' values; at most {MAX_TASK_VALUES}")
    names = [p for v in vals for p in split_combination(v)]
    if len(names) > MAX_TASK_VALUES:
        raise ServiceError(400, "too_many_tasks", f"{len(names)} task names; at most {MAX_TASK_VALUES}")
    return names


def _cost_key(m: MethodEntry, use_macs: bool) -> tuple[int, int, str]:
    return (m.macs if use_macs else len(m.tasks), len(m.tasks), m.name)


def smallest_superset(manifest: Manifest, tasks: list[str]) -> MethodEntry | None:
    """The exported method whose tasks include ``tasks`` with the fewest MACs (fewest tasks when the
    manifest carries no MACs); ``None`` when no exported method covers them."""
    want = set(tasks)
    cover = [m for m in manifest.methods if want <= set(m.tasks)]
    if not cover:
        return None
    use_macs = all(m.macs > 0 for m in manifest.methods)
    return min(cover, key=lambda m: _cost_key(m, use_macs))


def resolve(manifest: Manifest, requested: list[str] | None, *, strict: bool) -> Resolved:
    """Requested task names -> the method to run, or a 4xx (400 unknown/empty, 404 not exported)."""
    extra: dict[str, object] = {"valid_tasks": manifest.task_names}
    try:
        tasks = manifest.canonical(requested)
    except ExportError as e:
        raise ServiceError(_CLIENT_CODES.get(e.code, 400), e.code,
                           e.message + ("; separate tasks with ',' (tasks=a,b) or repeat tasks=" if
                                        e.code == "unknown_task" else ""), extra=extra) from e
    name = combination_name(tasks)
    exact = next((m for m in manifest.methods if m.name == name), None)
    if exact is not None:
        return Resolved(name, tasks, exact)
    sup = None if strict else smallest_superset(manifest, tasks)
    if sup is None:
        why = "strict mode: no superset method used" if strict else "and no exported method covers it"
        raise ServiceError(404, "combination_not_exported",
                           f"combination {name} was not exported ({why}); exported: "
                           f"{', '.join(m.name for m in manifest.methods)}",
                           extra={**extra, "exported_combinations": [m.name for m in manifest.methods]})
    return Resolved(name, tasks, sup)
