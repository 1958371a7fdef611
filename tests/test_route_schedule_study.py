"""The routes' schedule study pairs the same route, seed and combination of two bench runs."""

from __future__ import annotations

import pytest

from merging.errors import MergingError
from pam_app.route_schedule_study import pairs, summary


def _row(merger: str, seed: int, combo: str, own: int) -> dict:
    return {"merger": merger, "seed": seed, "combination": combo, "own_macs": {combo: own, "other": 1},
            "seconds_seed": {f"route {merger}": 60.0 * (seed + 1)}}


def test_ratios_use_the_routes_own_macs_of_matching_rows_only() -> None:
    fast = [_row("pam", 0, "a+b", 120), _row("pam", 1, "a+b", 100), _row("pam", 2, "a+b", 50),
            {"merger": "separate", "seed": 0, "combination": "a+b", "macs": 1}]  # no own MACs: not a route
    slow = [_row("pam", 0, "a+b", 100), _row("pam", 1, "a+b", 100)]
    recs = pairs(fast, slow)
    assert [(r["seed"], r["ratio"]) for r in recs] == [(0, 1.2), (1, 1.0)]
    (row,) = summary(recs, fast, slow)
    # median 1.10, one of two within 1.05x, the only differing pair is dearer; seconds of seeds 0-1 only
    assert row[:6] == ["pam", 2, "1.10", "1.00-1.20", "1 of 2", "1 of 1 (p 1.000)"]
    assert row[7] == "3.0 / 3.0"


def test_runs_without_a_shared_seed_are_refused() -> None:
    with pytest.raises(MergingError, match="share no"):
        pairs([_row("pam", 0, "a", 1)], [_row("pam", 1, "a", 1)])
