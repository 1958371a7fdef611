"""Does the routes' faster pruning schedule cost them MACs? Two ``pam bench`` runs of the same seeds compared.

``python -m pam_app.route_schedule_study --fast results/bench-digits.json --slow DIR/bench-digits.json``
(issue 20: "under the same budget rule every route ends within 5% of the MACs the slower schedule reaches
on digits seeds 0-2"). The fast run is ``pam bench --route-schedule fast``, the slow one ``pam bench`` (the
baseline's schedule, the default) or ``--route-schedule library``: the same zoo, yardstick and check
sets (a seed's jobs are deterministic), only the routes' schedule differs. For every route, seed and
combination: the MACs of the route's own pruned network (before the never-dearer rule, which would hide
a weaker pruner behind ``separate``) in both runs, and the route job's seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from merging.checkpoint import atomic_write_bytes, atomic_write_json
from merging.errors import MergingError
from merging.report import format_table
from pam_app.bench.files import load_rows, recorded_prune_config
from pam_app.bench.report import schedule_words
from pam_app.bench.schedule import ALONE, SPEC
from pam_app.schedule_study import sign_test

TOLERANCE = 1.05  # the "within 5%"
ALONE_PROJECT = "c_alone project"  # each task's network pruned alone by the project's pruner


def pairs(fast: list[dict[str, Any]], slow: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (route, seed, combination) present in both runs: own MACs fast and slow."""

    def own(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], int]:
        found = {
            (r["merger"], r["seed"], c): m
            for r in rows
            if "own_macs" in r and r["seed"] != "median"
            for c, m in r["own_macs"].items()
            if c == r["combination"]
        }
        # The yardstick is pruned with a schedule too: c_alone's project route per task, the specialists.
        for r in rows:
            if r["seed"] == "median":
                continue
            if r["merger"] == ALONE and (r.get("routes") or {}).get("project"):
                found[(ALONE_PROJECT, r["seed"], r["combination"])] = r["routes"]["project"]
            elif r["merger"] == SPEC and "+" in r["combination"]:
                found[(SPEC, r["seed"], r["combination"])] = r["macs"]
        return found

    a, b = own(fast), own(slow)
    keys = sorted(set(a) & set(b))
    if not keys:
        raise MergingError(
            "bad_argument",
            "the two runs share no (route, seed, combination) with the route's own "
            "MACs; run both with the same --seed-list and mergers",
        )
    return [
        {"route": k[0], "seed": k[1], "combination": k[2], "fast": a[k], "slow": b[k], "ratio": a[k] / max(1, b[k])}
        for k in keys
    ]


def _seconds(rows: list[dict[str, Any]], route: str, seeds: set[int]) -> float:
    """The route's job seconds summed over ``seeds`` (each seed's rows carry the same timing)."""

    def of(timing: dict[str, float]) -> float:
        if route == ALONE_PROJECT:
            return sum(v for k, v in timing.items() if k.startswith("alone ") and k.endswith(" project"))
        if route == SPEC:
            return sum(v for k, v in timing.items() if k.startswith("spec "))
        return timing.get(f"route {route}", 0.0)

    per_seed = {r["seed"]: of(r["seconds_seed"]) for r in rows if r.get("seconds_seed") and r["seed"] in seeds}
    return sum(per_seed.values())


def summary(recs: list[dict[str, Any]], fast: list[dict[str, Any]], slow: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    seeds = {r["seed"] for r in recs}
    most = max(r["combination"].count("+") for r in recs)  # the all-task combination
    for route in sorted({r["route"] for r in recs}):
        ratios = [r["ratio"] for r in recs if r["route"] == route]
        full = [
            r["ratio"]
            for r in recs
            if r["route"] == route and r["combination"].count("+") == most
        ]
        dearer, differ = sum(x > 1 for x in ratios), sum(x != 1 for x in ratios)
        out.append(
            [
                route,
                len(ratios),
                f"{statistics.median(ratios):.2f}",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
                f"{sum(x <= TOLERANCE for x in ratios)} of {len(ratios)}",
                f"{dearer} of {differ} (p {sign_test(dearer, differ):.3f})" if differ else "-",
                " / ".join(f"{x:.2f}" for x in full),
                f"{_seconds(fast, route, seeds) / 60:.1f} / {_seconds(slow, route, seeds) / 60:.1f}",
            ]
        )
    return out


def _schedule_of(path: Path) -> str:
    """The routes' schedule a bench run recorded (its .config.json), in words."""
    meta = path.with_suffix(".config.json")
    if not meta.exists():
        return "schedule not recorded"
    config = json.loads(meta.read_text())["config"]
    routes = recorded_prune_config(config["prune"])
    alone = recorded_prune_config(config.get("alone_prune", config["prune"]))
    return schedule_words(routes) + ("" if alone == routes else f"; {ALONE_PROJECT}: {schedule_words(alone)}")


def markdown(recs: list[dict[str, Any]], table: list[list[Any]], fast: Path, slow: Path) -> str:
    head = [
        "route",
        "combinations x seeds",
        "fast/slow MACs (median)",
        "range",
        f"within {TOLERANCE:.2f}x",
        "fast dearer (sign test)",
        "all tasks, per seed",
        "route job min fast / slow",
    ]
    return "\n".join(
        [
            "# Two pruning schedules on the same bench seeds (`python -m pam_app.route_schedule_study`)",
            "",
            f"Fast: `{fast}` ({_schedule_of(fast)}). Slow: `{slow}` ({_schedule_of(slow)}). Same seeds, zoo, "
            "budget rule; MACs of each route's own pruned network (before the never-dearer rule), of each task's "
            f"network pruned alone by the project's pruner (*{ALONE_PROJECT}*) and of each specialist (*{SPEC}*), "
            "where the run pruned them with that schedule. "
            f"Target (issue 20): every route within {TOLERANCE:.2f}x of the slow schedule's MACs.",
            "",
            format_table(head, table),
            "",
            "*fast dearer*: combinations where the fast schedule ends with more MACs, of those where the two differ, "
            "and the exact two-sided sign test (a schedule as strong as the slow one is dearer about half the time; "
            "combinations of one seed share a network, so they are not independent: read the per-seed all-task "
            "column too). *route job min*: the route's (or the yardstick's) job wall minutes summed over seeds.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pam_app.route_schedule_study", description=__doc__.split("\n")[0])
    p.add_argument("--fast", required=True, help="bench-<dataset>.json run with --route-schedule fast")
    p.add_argument("--slow", required=True, help="bench-<dataset>.json of the same seeds with a slower schedule "
                   "(the default, or --route-schedule library)")
    p.add_argument("--out", default="results", help="directory for schedule-routes.{json,md}")
    a = p.parse_args(argv)
    fast_path, slow_path = Path(a.fast), Path(a.slow)
    fast, slow = load_rows(fast_path), load_rows(slow_path)
    recs = pairs(fast, slow)
    table = summary(recs, fast, slow)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "schedule-routes.json", recs)
    text = markdown(recs, table, fast_path, slow_path)
    atomic_write_bytes(out / "schedule-routes.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
