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


def test_the_yardstick_pruned_alone_and_the_specialists_are_compared_too() -> None:
    """c_alone's project route per task and the specialists of two or more tasks, with their job seconds."""
    timing = {"alone a project": 30.0, "alone b project": 30.0, "alone a torch-pruning": 99.0, "spec a+b": 12.0}
    fast = [{"merger": "alone", "seed": 0, "combination": "a", "routes": {"project": 90, "torch-pruning": 10},
             "seconds_seed": timing},
            {"merger": "spec", "seed": 0, "combination": "a+b", "macs": 300},
            {"merger": "spec", "seed": 0, "combination": "a", "macs": 5}]  # a single task's "specialist" is c_alone
    slow = [{"merger": "alone", "seed": 0, "combination": "a", "routes": {"project": 100, "torch-pruning": 10},
             "seconds_seed": {k: 2 * v for k, v in timing.items()}},
            {"merger": "spec", "seed": 0, "combination": "a+b", "macs": 200},
            {"merger": "spec", "seed": 0, "combination": "a", "macs": 6}]
    recs = pairs(fast, slow)
    assert [(r["route"], r["combination"], r["ratio"]) for r in recs] == [("c_alone project", "a", 0.9),
                                                                          ("spec", "a+b", 1.5)]
    alone, spec = summary(recs, fast, slow)
    assert alone[7] == "1.0 / 2.0"  # the project route's jobs only: 60 s against 120 s
    assert spec[7] == "0.2 / 0.4"
