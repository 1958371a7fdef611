"""The canonical name of a combination (sorted task names joined by ``+``), the one way to split
a combination written by a person (``digit,parity``, ``parity+digit``, ``digit parity``), and the one
way to validate it against the known tasks (used by ``merging.tasks`` and the bundle manifest)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from pam_common.errors import CodedError

COMBINATION_SEPARATOR = "+"
# Task names may contain none of these (merging.tasks.TaskSpec refuses them), so splitting on all of
# them is safe; blanks are included because a literal '+' in a URL query arrives as a space.
_SPLIT = re.compile(r"[+,\s]+")


def combination_name(names: Iterable[str]) -> str:
    """``["parity", "digit", "parity"]`` -> ``"digit+parity"``: a combination is a set, so duplicates go."""
    return COMBINATION_SEPARATOR.join(sorted(set(names)))


def split_combination(text: str) -> list[str]:
    """Task names in the order written, empties dropped, not validated and not de-duplicated
    (callers check them against the tasks they know and report what is wrong)."""
    return [p for p in _SPLIT.split(text) if p]


def canonical_combination(
    requested: Iterable[str] | str, known: Sequence[str], error: Callable[[str, str], Exception] = CodedError
) -> tuple[str, ...]:
    """Validate and normalise a request: sorted, de-duplicated task names.

    Accepts ``"a,b"``, ``"a+b"``, ``"a b"`` or an iterable of names. An empty request or an unknown
    name raises ``error(code, message)`` (codes ``empty_combination``, ``unknown_task``); each layer
    passes its own :class:`CodedError` subclass, so the one rule reports in the caller's terms."""
    if isinstance(requested, str):
        parts = split_combination(requested)
    else:
        parts = [p for p in (str(p).strip() for p in requested) if p]
    if not parts:
        raise error("empty_combination", f"a combination needs at least one task; known tasks: {', '.join(known)}")
    unknown = sorted(set(parts) - set(known))
    if unknown:
        raise error("unknown_task", f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(known)}")
    return tuple(sorted(set(parts)))
