"""``pam bench``'s report: markdown, plot, JSON, and joining runs of distinct seeds."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from merging.checkpoint import atomic_write_bytes, atomic_write_json
from merging.errors import MergingError
from merging.pruning import PruneConfig
from merging.references import ROUTES
from merging.tasks import combination_name
from pam_app.bench.rows import (
    RATIOS,
    _median,
    add_ratios,
    best_route,
    budget_miss_share,
    median_rows,
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
        f"same pruner for every merger, reference and specialist (budget {pc.budget} point(s) per task, one-sided "
        f"{pc.confidence:.0%} paired test on val, plus {pc.check_shifts} shifted copies while val has fewer than "
        f"{pc.shift_below:,} images; criterion {pc.criterion}, price {pc.price}, step {pc.step} (min {pc.min_step}), "
        f"fine-tune {pc.finetune_epochs}+{pc.retry_epochs} epochs, final {pc.final_epochs}, an epoch at most "
        f"{REFERENCE_TRAIN_SIZE:,} samples). Wall time {elapsed / 60:.1f} min.",
        "",
        "Medians over seeds of per-seed values, [min-max] in brackets. MACs per combination after pruning. "
        "*spec* = c_spec(C): a hard-shared trunk trained for exactly C and pruned by the same pruner "
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
            "*wins* = seeds where the route was the smallest; *project/alone* = median of per-seed ratios):",
            "",
        ]
        head = ["task", *routes, "c_alone", "wins", "project/alone"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in tasks:
            rs = [r for r in alone_rows if r["combination"] == t]
            cells = [t]
            for route in routes:
                vals = [r["routes"][route] for r in rs if r["routes"].get(route) is not None]
                cells.append(f"{_median(vals):,.0f} ({len(vals)}/{len(rs)})" if vals else "-")
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
             "combinations of two or more tasks where it costs more / less than `separate`):", "",
             "| route | all-task MACs | dearer than separate | cheaper than separate | shipped merged (seeds) |",
             "|---|---|---|---|---|"]
    for m, o in own.items():
        lines.append(f"| {m} | {_fmt_range(o['all_macs'], o['all_range'], ',.0f')} | "
                     f"{', '.join(map(str, o['dearer']))} of {o['multi']} | {', '.join(map(str, o['cheaper']))} | "
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


def plot(cfg: BenchConfig, rows: list[dict[str, Any]], mergers: Sequence[str], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = {(r["merger"], r["combination"]): r for r in rows if r["seed"] == "median"}
    combos = [c for (m, c) in med if m == REFERENCE]
    width = 0.8 / len(mergers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(combos) * max(1, len(mergers)) / 2), 4.5))
    for k, m in enumerate(mergers):
        xs = [i + (k - (len(mergers) - 1) / 2) * width for i in range(len(combos))]
        vals = [med[(m, c)]["macs"] if (m, c) in med else 0 for c in combos]
        lo = [v - med[(m, c)]["macs_range"][0] if (m, c) in med else 0 for v, c in zip(vals, combos, strict=True)]
        hi = [med[(m, c)]["macs_range"][1] - v if (m, c) in med else 0 for v, c in zip(vals, combos, strict=True)]
        ax.bar(xs, vals, width, label=m, yerr=[lo, hi], capsize=1.5, error_kw={"elinewidth": 0.6})
    for i, c in enumerate(combos):
        lim = med[(REFERENCE, c)].get("limit")
        if lim:
            ax.hlines(lim, i - 0.45, i + 0.45, colors="black", linewidth=1.2, label="limit" if i == 0 else "_nolegend_")
        spec = med.get((SPEC, c))
        if spec:
            ax.plot(
                [i],
                [spec["macs"]],
                marker="*",
                color="crimson",
                markersize=9,
                linestyle="none",
                label="c_spec" if not any(med.get((SPEC, cc)) for cc in combos[:i]) else "_nolegend_",
            )
    ax.set_xticks(range(len(combos)))
    ax.set_xticklabels(combos, rotation=75, fontsize=7)
    ax.set_ylabel("MACs after pruning (median over seeds)")
    ax.set_title(f"{cfg.dataset}: cost of every combination")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def render(json_path: Path) -> None:
    """Rewrite the markdown and plot of a bench JSON (with its .config.json) after a report change."""
    meta = json.loads(json_path.with_suffix(".config.json").read_text())
    c = meta["config"]
    cfg = _config_from_json(c, json_path.parent, c["seeds"])
    rows = load_rows(json_path)
    md = markdown(cfg, rows, meta["mergers"], meta["seconds"])
    atomic_write_bytes(json_path.with_suffix(".md"), md.encode())
    plot(cfg, rows, meta["mergers"], json_path.with_suffix(".png"))


def combine(json_paths: Sequence[Path], out_dir: Path) -> list[dict[str, Any]]:
    """Merge bench runs of one data set made with the same settings on different seeds (e.g. run in
    parallel processes) into one report: per-seed rows concatenated, ratios and medians recomputed."""
    metas = []
    for p in json_paths:
        meta = p.with_suffix(".config.json")
        if not p.is_file() or not meta.is_file():
            raise MergingError("bad_argument", f"{p} and its {meta.name} (written beside it by pam bench) are needed")
        metas.append(json.loads(meta.read_text()))
    first = metas[0]["config"]
    same = ("dataset", "arch", "width_mult", "zoo_epochs", "prune", "routes", "spec_sizes", "width_grid", "tp_schedule")
    for m in metas[1:]:
        diff = [k for k in same if m["config"].get(k) != first.get(k)]
        if diff:
            raise MergingError("bad_argument", f"bench runs differ in {diff}; only runs with the same settings combine")
    rows = [r for p in json_paths for r in load_rows(p) if r["seed"] != "median"]
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) != sum(len(m["config"]["seeds"]) for m in metas):
        raise MergingError("bad_argument", "bench runs share a seed; combine runs of distinct seeds")
    for r in rows:
        for k in ("limit", "c_spec", *RATIOS):
            r.pop(k, None)
    add_ratios(rows)
    rows.extend(median_rows(rows))
    mergers = list(dict.fromkeys(m for meta in metas for m in meta["mergers"]))
    cfg = _config_from_json(first, out_dir, seeds)
    write_results(cfg, rows, mergers, sum(m["seconds"] for m in metas))
    return rows


def _config_from_json(c: Mapping[str, Any], out_dir: Path, seeds: Sequence[int]) -> BenchConfig:
    return BenchConfig(
        dataset=c["dataset"],
        seeds=tuple(seeds),
        arch=c["arch"],
        zoo_epochs=c["zoo_epochs"],
        width_mult=c.get("width_mult", 1.0),
        tasks=tuple(c.get("tasks", ())),
        prune=PruneConfig(**c["prune"]),
        routes=tuple(c.get("routes", ROUTES)),
        spec_sizes=tuple(c.get("spec_sizes", (2, -1))),
        out_dir=out_dir,
    )


def write_results(cfg: BenchConfig, rows: list[dict[str, Any]], mergers: Sequence[str], elapsed: float) -> None:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)

    def stem(suffix: str) -> Path:  # not Path.with_suffix: a width such as w0.25 would read as a suffix
        return cfg.out_dir / f"{cfg.stem}{suffix}"

    atomic_write_json(stem(".json"), rows)
    md = markdown(cfg, rows, mergers, elapsed)
    atomic_write_bytes(stem(".md"), md.encode())
    plot(cfg, rows, mergers, stem(".png"))
    config = asdict(cfg)
    config["out_dir"] = str(cfg.out_dir)
    atomic_write_json(stem(".config.json"), {"config": config, "mergers": list(mergers), "seconds": round(elapsed, 1)})


def load_rows(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text()))
