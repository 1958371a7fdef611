"""``pam bench``'s result files: the plot, the JSON and markdown written atomically, re-rendering a
recorded run, and joining runs of distinct seeds into one report."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from merging.checkpoint import atomic_write_bytes, atomic_write_json
from merging.errors import MergingError
from merging.pruning import PruneConfig
from merging.references import ROUTES
from pam_app.bench.report import markdown
from pam_app.bench.rows import (
    RATIOS,
    add_ratios,
    median_rows,
)
from pam_app.bench.schedule import REFERENCE, SPEC, BenchConfig


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
    same = ("dataset", "arch", "width_mult", "zoo_epochs", "prune", "alone_prune", "routes", "spec_sizes", "width_grid",
            "tp_schedule")
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


def recorded_prune_config(d: Mapping[str, Any]) -> PruneConfig:
    """A recorded pruner config; runs recorded before ``removes`` said ``regroup: bool``."""
    d = dict(d)
    if "regroup" in d:
        d["removes"] = "pairs" if d.pop("regroup") else "channels"
    return PruneConfig(**d)


def _config_from_json(c: Mapping[str, Any], out_dir: Path, seeds: Sequence[int]) -> BenchConfig:
    return BenchConfig(
        dataset=c["dataset"],
        seeds=tuple(seeds),
        arch=c["arch"],
        zoo_epochs=c["zoo_epochs"],
        width_mult=c.get("width_mult", 1.0),
        tasks=tuple(c.get("tasks", ())),
        prune=recorded_prune_config(c["prune"]),
        # runs recorded before c_alone had its own schedule pruned it with the routes' pruner
        alone_prune=recorded_prune_config(c.get("alone_prune", c["prune"])),
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
    config["save_models"] = str(cfg.save_models) if cfg.save_models else None
    atomic_write_json(stem(".config.json"), {"config": config, "mergers": list(mergers), "seconds": round(elapsed, 1)})


def load_rows(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text()))
