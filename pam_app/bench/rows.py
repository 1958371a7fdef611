"""Per-seed rows of ``pam bench`` turned into the figures it reports: ratios per seed, then medians and
ranges over seeds (never ratios of medians)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from merging.tasks import combination_name
from pam_app.bench.schedule import ALONE, BASELINE, REFERENCE, SPEC


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def wilson(correct: float, n: int, z: float = 1.96) -> list[float]:
    """Binomial 95% (Wilson) interval of an accuracy, in percent."""
    if n <= 0:
        return [0.0, 100.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)]


RATIOS = ("ratio_to_pam", "ratio_to_spec", "ratio_to_separate", "sharing_efficiency")


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per seed (in place): limit = max_{t in C} c_alone(t); each row's MACs over PAM's, over the
    specialist's c_spec(C) and over separate's; PAM's sharing efficiency c_pam(C) / limit."""
    rows = [r for r in rows if "error" not in r and r["merger"] != ALONE]
    by = {(r["seed"], r["merger"], r["combination"]): r for r in rows}
    for r in rows:
        seed, combo = r["seed"], r["combination"]
        singles = [by.get((seed, SPEC, t)) for t in combo.split("+")]
        if all(singles):
            r["limit"] = max(s["macs"] for s in singles if s)
        spec = by.get((seed, SPEC, combo))
        if spec:
            r["c_spec"] = spec["macs"]
        for key, other in (("ratio_to_pam", REFERENCE), ("ratio_to_spec", SPEC), ("ratio_to_separate", BASELINE)):
            o = by.get((seed, other, combo))
            if o:
                r[key] = r["macs"] / max(1, o["macs"])
        if r["merger"] != SPEC and "limit" in r:
            r["sharing_efficiency"] = r["macs"] / r["limit"]


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians (and ranges) over seeds of every per-seed quantity, ratios included (never ratios of medians)."""
    rows = [r for r in rows if "error" not in r and r["merger"] != ALONE]
    out: list[dict[str, Any]] = []
    keys = sorted({(r["merger"], r["combination"]) for r in rows}, key=lambda k: (k[0], len(k[1].split("+")), k[1]))
    for merger, combo in keys:
        rs = [r for r in rows if r["merger"] == merger and r["combination"] == combo]
        m: dict[str, Any] = {
            "dataset": rs[0]["dataset"],
            "merger": merger,
            "combination": combo,
            "seed": "median",
            "seeds": len(rs),
        }
        for k in ("macs", "params", "macs_merged", "limit", "c_spec", *RATIOS):
            vals = [r[k] for r in rs if k in r]
            if vals:
                m[k] = _median(vals)
                m[f"{k}_range"] = [min(vals), max(vals)]
        for k in ("accuracy", "check_accuracy", "reference_accuracy"):
            m[k] = {t: _median([r[k][t] for r in rs]) for t in rs[0][k]}
        m["accuracy_range"] = {
            t: [min(r["accuracy"][t] for r in rs), max(r["accuracy"][t] for r in rs)] for t in rs[0]["accuracy"]
        }
        m["within_budget"] = sum(bool(r["within_budget"]) for r in rs)
        m["merge_attempts"] = [r.get("merge_attempts", 1) for r in rs]
        m["fell_back"] = sum(1 for r in rs if r.get("final_merger", merger) != merger)
        out.append(m)
    return out


def budget_miss_share(rows: list[dict[str, Any]], threshold: float = 1.0) -> tuple[int, int]:
    """(networks within budget on the check set that lose more than ``threshold`` points on test, of all
    within budget): one count per seed, merger/route and task, on single-task rows."""
    hit = total = 0
    for r in rows:
        if r["seed"] == "median" or "error" in r or r["merger"] == ALONE or "+" in r["combination"]:
            continue
        t = r["combination"]
        if r["within_budget"]:
            total += 1
            hit += r["reference_accuracy"][t] - r["accuracy"][t] > threshold
    return hit, total


def route_summary(rows: list[dict[str, Any]], mergers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per route (merger, with or without regrouping), the figures the claim is judged by, each the
    median over seeds of a per-seed ratio (worst case over combinations where it says so)."""
    per_seed = [r for r in rows if r["seed"] != "median" and "error" not in r and r["merger"] != ALONE]
    seeds = sorted({r["seed"] for r in per_seed})
    by = {(r["seed"], r["merger"], r["combination"]): r for r in per_seed}
    combos = sorted({r["combination"] for r in per_seed if r["merger"] == REFERENCE}, key=lambda c: (c.count("+"), c))
    tasks = [c for c in combos if "+" not in c]
    full = combination_name(tasks)

    def med_ratio(route: str, other: str, combo: str) -> float | None:
        vals = [
            by[(s, route, combo)]["macs"] / max(1, by[(s, other, combo)]["macs"])
            for s in seeds
            if (s, route, combo) in by and (s, other, combo) in by
        ]
        return _median(vals) if vals else None

    out: dict[str, dict[str, float]] = {}
    for m in mergers:
        if m == BASELINE:
            continue
        spec = [v for c in combos if (v := med_ratio(m, SPEC, c)) is not None]
        shared_single = [v for t in tasks if (v := med_ratio(m, "shared", t)) is not None]
        shared_full = med_ratio(m, "shared", full)
        sep_multi = [v for c in combos if "+" in c and (v := med_ratio(BASELINE, m, c)) is not None]
        mtz = [v for c in combos if (v := med_ratio("mtz", m, c)) is not None]
        acc = [
            _median(
                [
                    by[(s, m, t)]["accuracy"][t] - by[(s, m, t)]["reference_accuracy"][t]
                    for s in seeds
                    if (s, m, t) in by
                ]
            )
            for t in tasks
            if any((s, m, t) in by for s in seeds)
        ]
        row: dict[str, float] = {}
        if spec:
            row["worst_over_spec"] = max(spec)
        if shared_single and m != "shared":
            row["worst_single_over_shared"] = max(shared_single)
        if shared_full is not None and m != "shared":
            row["all_over_shared"] = shared_full
        if sep_multi:
            row["min_separate_over_route"] = min(sep_multi)
        if mtz and m != "mtz":
            row["max_mtz_over_route"], row["min_mtz_over_route"] = max(mtz), min(mtz)
        if acc:
            row["worst_accuracy_change"] = min(acc)
        out[m] = row
    return out


def best_route(summary: Mapping[str, Mapping[str, float]]) -> str | None:
    """The route whose worst combination is closest to the specialist limit (None when no route is
    strictly closer than another: e.g. every route shipped the separately pruned networks)."""
    scored = {m: v["worst_over_spec"] for m, v in summary.items() if "worst_over_spec" in v}
    if not scored:
        return None
    best = min(scored, key=lambda m: (scored[m], m))
    return best if sum(v == scored[best] for v in scored.values()) == 1 else None


def own_networks(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per route, what its *own* pruned network cost before the never-dearer rule chose what ships:
    all-task MACs (median and range over seeds), and per seed how many combinations of two or more
    tasks it made dearer / cheaper than ``separate``, the largest ratio to ``separate`` over those
    combinations (``worst``: how far from never-dearer it was), and whether it shipped."""
    per_seed = [r for r in rows if r["seed"] != "median" and "own_macs" in r]
    sep = {(r["seed"], r["combination"]): r["macs"] for r in rows if r["seed"] != "median" and r["merger"] == BASELINE}
    out: dict[str, dict[str, Any]] = {}
    for m in sorted({r["merger"] for r in per_seed}):
        firsts = {r["seed"]: r for r in per_seed if r["merger"] == m}  # own_macs is the same on every row of a seed
        full = [max(r["own_macs"].values()) for r in firsts.values()]
        dearer = [sum(v > sep[(s, c)] for c, v in r["own_macs"].items() if "+" in c and (s, c) in sep)
                  for s, r in firsts.items()]
        cheaper = [sum(v < sep[(s, c)] for c, v in r["own_macs"].items() if "+" in c and (s, c) in sep)
                   for s, r in firsts.items()]
        worst = [max((v / sep[(s, c)] for c, v in r["own_macs"].items() if "+" in c and (s, c) in sep), default=None)
                 for s, r in firsts.items()]
        multi = max((sum("+" in c for c in r["own_macs"]) for r in firsts.values()), default=0)
        out[m] = {"all_macs": _median(full), "all_range": [min(full), max(full)], "dearer": dearer,
                  "cheaper": cheaper, "worst": worst, "multi": multi,
                  "shipped": sum(not r.get("shipped", "separate").startswith("separate") for r in firsts.values()),
                  "seeds": len(firsts)}
    return out
