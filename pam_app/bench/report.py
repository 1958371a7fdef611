"""``pam bench``'s report: the markdown, in sections that read one view of the rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merging.pruning import PruneConfig
from merging.references import GRID
from merging.tasks import combination_name
from pam_app.bench.rows import (
    _median,
    best_route,
    budget_miss_share,
    own_networks,
    route_summary,
)
from pam_app.bench.schedule import ALONE, BASELINE, REFERENCE, REFERENCE_TRAIN_SIZE, SPEC, ZOO_EPOCHS, BenchConfig


def _fmt_range(v: float, r: Sequence[float], fmt: str) -> str:
    return f"{v:{fmt}} [{r[0]:{fmt}}-{r[1]:{fmt}}]"


def _cell(r: Mapping[str, Any] | None, key: str, fmt: str = ".2f") -> str:
    if not r or key not in r:
        return "-"
    return _fmt_range(r[key], r[f"{key}_range"], fmt)


@dataclass
class _View:
    """What every section of the report reads: medians by (merger, combination), and the run's axes."""

    cfg: BenchConfig
    rows: list[dict[str, Any]]
    mergers: Sequence[str]
    med: dict[tuple[str, str], dict[str, Any]]
    combos: list[str]
    tasks: list[str]
    seeds: list[Any]
    alone_rows: list[dict[str, Any]]

    @property
    def others(self) -> list[str]:
        return [m for m in self.mergers if m != REFERENCE]


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]], mergers: Sequence[str], elapsed: float) -> str:
    med = {(r["merger"], r["combination"]): r for r in rows if r["seed"] == "median"}
    combos = [c for (m, c) in med if m == REFERENCE]
    v = _View(
        cfg,
        rows,
        mergers,
        med,
        combos,
        sorted(c for c in combos if "+" not in c),
        sorted({r["seed"] for r in rows if r["seed"] != "median"}),
        [r for r in rows if r["merger"] == ALONE],
    )
    lines = _intro(v, elapsed) + _cost_table(v) + _alone_table(v) + _accuracy_table(v) + _budget_notes(v)
    lines += _own_networks(v) + _targets(v) + _routes_table(v)
    worst_acc = min(
        (med[(REFERENCE, t)]["accuracy"][t] - med[(REFERENCE, t)]["reference_accuracy"][t], t) for t in v.tasks
    )
    lines.append(
        f"- worst PAM median test-accuracy change vs single-task: {worst_acc[0]:+.2f} points ({worst_acc[1]}) "
        "(target >= -1.0)"
    )
    return "\n".join(lines) + "\n"


def schedule_words(pc: PruneConfig) -> str:
    """A pruner's schedule in words."""
    parts = f" (in {pc.retry_checks} judged parts)" if pc.retry_checks > 1 else ""
    return (f"criterion {pc.criterion}, price {pc.price}, step {pc.step} (min {pc.min_step}, at most "
            f"{pc.max_steps} steps), fine-tune {pc.finetune_epochs}+{pc.retry_epochs}{parts} epochs in batches of "
            f"{pc.batch_size} (lr {pc.lr:g}), final {pc.final_epochs}, Taylor scores from {pc.taylor_batches} batches")


def _intro(v: _View, elapsed: float) -> list[str]:
    """The title, what ran and how it was judged."""
    cfg = v.cfg
    mergers = v.mergers
    seeds = v.seeds
    lines: list[str] = []
    pc = cfg.prune
    width = f" (width x{cfg.width_mult:g})" if cfg.width_mult != 1.0 else ""
    zoo = ZOO_EPOCHS.get(cfg.dataset, f"{cfg.zoo_epochs} (fewer on a training split above {REFERENCE_TRAIN_SIZE:,})")
    lines += [
        f"# Benchmark: {cfg.dataset}",
        "",
        f"Mergers {', '.join(mergers)}; seeds {seeds}; zoo {cfg.arch}{width} trained {zoo} epochs per seed; "
        f"budget {pc.budget} point(s) per task, one-sided {pc.confidence:.0%} paired test on val, plus "
        f"{pc.check_shifts} shifted copies while val has fewer than {pc.shift_below:,} images; every route pruned "
        f"and every specialist by {schedule_words(pc)}; c_alone's project route by {schedule_words(cfg.alone_prune)}"
        f"{' (the same)' if cfg.alone_prune == pc else ''}; an epoch at most {REFERENCE_TRAIN_SIZE:,} samples. "
        f"Wall time {elapsed / 60:.1f} min.",
        "",
        "Medians over seeds of per-seed values, [min-max] in brackets. MACs per combination after pruning. "
        "*spec* = c_spec(C): a hard-shared trunk trained for exactly C and pruned by the routes' pruner "
        "(for a single task, c_alone(t): the best of the project's pruner, Torch-Pruning's iterative pruning "
        "and the narrowest width trained from scratch). *separate* = each task's c_alone network (no merging, "
        "as strong as it gets). *limit* = max over t in C of c_alone(t).",
        "",
    ]
    return lines


def _cost_table(v: _View) -> list[str]:
    """MACs of every combination per route, and the ratios."""
    mergers = v.mergers
    med = v.med
    combos = v.combos
    others = v.others
    lines: list[str] = []
    head = [
        "combination",
        "spec",
        "limit",
        *[f"{m} MACs" for m in mergers],
        *[f"{m}/pam" for m in others],
        *[f"{m}/spec" for m in mergers],
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in combos:
        spec = med.get((SPEC, c))
        cells = [c, f"{spec['macs']:,.0f}" if spec else "-", f"{med[(REFERENCE, c)].get('limit', float('nan')):,.0f}"]
        cells += [f"{med[(m, c)]['macs']:,.0f}" if (m, c) in med else "-" for m in mergers]
        cells += [_cell(med.get((m, c)), "ratio_to_pam") for m in others]
        cells += [_cell(med.get((m, c)), "ratio_to_spec") for m in mergers]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _alone_table(v: _View) -> list[str]:
    """The three c_alone routes per task."""
    tasks = v.tasks
    alone_rows = v.alone_rows
    lines: list[str] = []
    if alone_rows:
        routes = list(alone_rows[0]["routes"])
        lines += [
            "",
            "c_alone routes per task (median MACs of each route's smallest network within budget; "
            "*wins* = seeds where the route was the smallest; *project/alone* = median of per-seed ratios; "
            "*stopped* = seeds where the width grid found no width within budget up to the MACs of the other "
            "two routes' best and trained no wider one, since it could not have won):",
            "",
        ]
        head = ["task", *routes, "c_alone", "wins", "project/alone"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in tasks:
            rs = [r for r in alone_rows if r["combination"] == t]
            cells = [t]
            for route in routes:
                vals = [r["routes"][route] for r in rs if r["routes"].get(route) is not None]
                stopped = sum(route == GRID and bool(r.get("grid_stopped")) for r in rs)
                cell = f"{_median(vals):,.0f} ({len(vals)}/{len(rs)})" if vals else "-"
                cells.append(cell + (f", {stopped} stopped" if stopped else ""))
            ratios = [r["routes"]["project"] / r["macs"] for r in rs if r["routes"].get("project")]
            wins = {route: sum(r["best_route"] == route for r in rs) for route in routes}
            cells += [
                f"{_median([r['macs'] for r in rs]):,.0f}",
                ", ".join(f"{k} {v}" for k, v in wins.items() if v),
                _fmt_range(_median(ratios), [min(ratios), max(ratios)], ".2f") if ratios else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _accuracy_table(v: _View) -> list[str]:
    """Test accuracy per task and route."""
    rows = v.rows
    mergers = v.mergers
    med = v.med
    tasks = v.tasks
    lines: list[str] = []
    lines += [
        "",
        "Test accuracy per task (median [min-max] over seeds; the last column: the Wilson 95% interval "
        "of PAM's median seed); *single* = the unpruned single-task network.",
        "",
    ]
    shown = [*mergers, SPEC]
    head = ["task", "single", *shown, "pam 95% CI (one seed)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        cells = [t, f"{med[(REFERENCE, t)]['reference_accuracy'][t]:.2f}"]
        for m in shown:
            r = med.get((m, t))
            cells.append(_fmt_range(r["accuracy"][t], r["accuracy_range"][t], ".2f") if r else "-")
        pam_rows = sorted(
            (r for r in rows if r["merger"] == REFERENCE and r["combination"] == t and r["seed"] != "median"),
            key=lambda r: r["accuracy"][t],
        )
        if pam_rows:
            lo, hi = pam_rows[len(pam_rows) // 2]["accuracy_ci95"][t]
            cells.append(f"{lo:.1f}-{hi:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _budget_notes(v: _View) -> list[str]:
    """Budget verdicts, re-merges, failures and the time split."""
    rows = v.rows
    mergers = v.mergers
    med = v.med
    tasks = v.tasks
    seeds = v.seeds
    lines: list[str] = []
    shown = [*mergers, SPEC]
    budget = {m: med[(m, tasks[0])]["within_budget"] for m in shown if (m, tasks[0]) in med}
    lines += [
        "",
        "In budget on the check set (seeds, first task): "
        + ", ".join(f"{m} {v}/{len(seeds)}" for m, v in budget.items()),
    ]
    hit, total = budget_miss_share(rows)
    lines += [
        f"Networks within budget on the check set that lose more than 1 point on test: {hit}/{total} "
        f"({100.0 * hit / max(1, total):.0f}%; per seed, merger or reference, and task).",
        "",
    ]
    regrown = {m: sum(a > 1 for a in med[(m, tasks[0])]["merge_attempts"]) for m in mergers if (m, tasks[0]) in med}
    if any(regrown.values()):
        fell = {m: med[(m, tasks[0])]["fell_back"] for m in regrown}
        lines += [
            "Merged again with more capacity after missing the budget before pruning (seeds): "
            + ", ".join(
                f"{m} {v}" + (f" (of which {fell[m]} fell back to keeping the networks apart)" if fell[m] else "")
                for m, v in regrown.items()
                if v
            )
            + " (`merging.pipeline`).",
            "",
        ]
    for r in rows:
        if "error" in r:
            lines.append(f"- **{r['merger']} failed on seed {r['seed']}**: {r['error']}")
    per_seed = {r["seed"]: r["seconds_seed"] for r in rows if r["seed"] != "median" and "seconds_seed" in r}
    if per_seed:
        parts = {k: sum(t.get(k, 0.0) for t in per_seed.values()) for k in next(iter(per_seed.values()))}
        lines += ["", "Time split (all seeds): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in parts.items()), ""]
    return lines


def _own_networks(v: _View) -> list[str]:
    """What each route's own pruned network cost, before the never-dearer rule (the tables above show
    what ships: ``separate`` wherever the route was dearer on some combination of two or more tasks)."""
    own = own_networks(v.rows)
    if not own:
        return []
    lines = ["", "Each route's own pruned network, before the never-dearer rule chose what ships (per seed: "
             "combinations of two or more tasks where it costs more / less than `separate`, and its largest "
             "MAC ratio to `separate` over them):", "",
             "| route | all-task MACs | dearer than separate | cheaper than separate | worst ratio to separate "
             "| shipped merged (seeds) |",
             "|---|---|---|---|---|---|"]
    for m, o in own.items():
        lines.append(f"| {m} | {_fmt_range(o['all_macs'], o['all_range'], ',.0f')} | "
                     f"{', '.join(map(str, o['dearer']))} of {o['multi']} | {', '.join(map(str, o['cheaper']))} | "
                     f"{', '.join('-' if w is None else f'{w:.2f}x' for w in o['worst'])} | "
                     f"{o['shipped']}/{o['seeds']} |")
    return [*lines, ""]


def _targets(v: _View) -> list[str]:
    """The issue's targets as measured."""
    mergers = v.mergers
    med = v.med
    combos = v.combos
    tasks = v.tasks
    alone_rows = v.alone_rows
    others = v.others
    lines: list[str] = []
    hit, total = budget_miss_share(v.rows)
    lines += ["", "## Targets (as measured, medians of per-seed ratios)", ""]
    full = combination_name(tasks)
    if alone_rows:
        worst = max(
            (
                _median(
                    [
                        r["routes"]["project"] / r["macs"]
                        for r in alone_rows
                        if r["combination"] == t and r["routes"].get("project")
                    ]
                    or [float("inf")]
                ),
                t,
            )
            for t in tasks
        )
        lines.append(f"- project pruner / c_alone, worst task: {worst[0]:.2f} ({worst[1]}) (target <= 1.05)")
    share = 100.0 * hit / max(1, total)
    lines.append(f"- within-budget networks losing > 1 point on test: {share:.0f}% (target <= 5%)")
    for m in mergers:
        spec_ratios = [(med[(m, c)]["ratio_to_spec"], c) for c in combos if "ratio_to_spec" in med.get((m, c), {})]
        if spec_ratios:
            w = max(spec_ratios)
            lines.append(f"- {m}/spec, worst benchmarked combination: {w[0]:.2f} ({w[1]})")
    for m in others:
        r = med.get((m, full), {})
        if "ratio_to_pam" in r:
            lines.append(f"- {m}/pam on {full}: {r['ratio_to_pam']:.2f}")
    if (BASELINE, tasks[0]) in med:
        single = max((med[(REFERENCE, t)].get("ratio_to_separate", float("nan")), t) for t in tasks)
        lines.append(f"- worst c_pam(t)/c_sep(t) over single tasks: {single[0]:.2f} ({single[1]})")
    return lines


def _routes_table(v: _View) -> list[str]:
    """One line per route against the targets, and the best route."""
    rows = v.rows
    mergers = v.mergers
    lines: list[str] = []
    summary = route_summary(rows, mergers)
    if summary:
        lines += [
            "",
            "Routes (merger, `+regroup` = pruned with regrouping), medians over seeds of per-seed ratios: "
            "*worst/spec* = max over benchmarked C of c_route(C)/c_spec(C) (target <= 1.10); *single/shared* = "
            "max over single tasks (target < 1); *all/shared* (target <= 1.05); *separate/route* = min over "
            "combinations of 2+ tasks (target > 1); *mtz/route* max and min (targets >= 2.01 and >= 0.95); "
            "*acc* = worst median test-accuracy change (target >= -1.0).",
            "",
        ]
        head = [
            "route",
            "worst/spec",
            "single/shared",
            "all/shared",
            "separate/route",
            "mtz/route max",
            "mtz/route min",
            "acc",
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        keys = [
            "worst_over_spec",
            "worst_single_over_shared",
            "all_over_shared",
            "min_separate_over_route",
            "max_mtz_over_route",
            "min_mtz_over_route",
            "worst_accuracy_change",
        ]
        for m, v in summary.items():
            lines.append("| " + " | ".join([m, *(f"{v[k]:.2f}" if k in v else "-" for k in keys)]) + " |")
        b = best_route(summary)
        lines += ["", f"Best route (closest to the specialist limit on its worst combination): **{b}**." if b else
                  "Best route: none (tied: no route is closer to the specialist limit than another)."]
        lines.append("")
    return lines
