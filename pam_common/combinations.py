"""The canonical name of a combination (sorted task names joined by ``+``) and the one way to split
a combination written by a person (``digit,parity``, ``parity+digit``, ``digit parity``)."""

from __future__ import annotations

import re
from collections.abc import Iterable

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
