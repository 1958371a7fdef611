"""``pam bench``: the project's claim, measured.

For every merger (``separate``, ``shared``, ``pam`` and any merger registered later), over
several seeds: train the single-task zoo, merge, prune with the *same* pruner and budget, and
record the MACs of every combination and each task's accuracy. Decisions (the pruning budget)
use the validation split only (the check set of :func:`merging.pruning.check_set`); the test
split is only reported.

Beside each combination C: the *limit of sharing* ``max_{t in C} c_sep(t)`` (what C would cost
if the costliest task's separately pruned network could serve all of C) and PAM's *sharing
efficiency* ``c_pam(C) / limit``; and every merger's cost ratio to PAM. Everything is computed
per seed, then summarised by the median and the range over seeds.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.arch import create_arch
from merging.checkpoint import atomic_write_bytes, atomic_write_json
from merging.cost import cost_table
from merging.data import load_dataset
from merging.data.base import Splits
from merging.errors import MergingError
from merging.mergers import create_merger, list_mergers
from merging.network import MultitaskNet
from merging.pipeline import merge_and_prune
from merging.pruning import PruneConfig, check_set, reference_accuracy, within_budget
from merging.tasks import combination_name
from merging.train import TrainConfig, evaluate, train_single_task

BASELINE = "separate"
REFERENCE_TRAIN_SIZE = 1078  # digits' training split, for which the epoch counts are set
REFERENCE = "pam"


# The same pruner for every merger; steps sized so 3 data sets x 5 seeds fit the time budget.
BENCH_PRUNE = PruneConfig(step=0.2, min_step=0.05, max_steps=20, finetune_epochs=2, retry_epochs=2, taylor_batches=4,
                          progress=False)


@dataclass(frozen=True)
class BenchConfig:
    dataset: str = "digits"  # digits | digits-partitions | composite (or any registered data set)
    tasks: tuple[str, ...] = ()  # subset of the data set's tasks (empty: all)
    mergers: tuple[str, ...] = ()  # empty: every registered merger
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # each seed trains its own zoo, merges and prunes
    arch: str = "lenet"  # architecture family of the zoo
    zoo_epochs: int = 40  # training epochs of each single-task network (and of the shared trunk)
    split_seed: int = 0  # train/val/test split of the data set
    prune: PruneConfig = field(default_factory=lambda: BENCH_PRUNE)
    merger_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-merger keyword options
    out_dir: Path = Path("results")  # where bench-<dataset>.{json,md,png} go
    progress: bool = True


def quick_config(dataset: str, **overrides: Any) -> BenchConfig:
    """The CI mode: 2 seeds, shorter training, coarser pruning steps, a lighter MTZ search."""
    pc = replace(BENCH_PRUNE, finetune_epochs=1, retry_epochs=1, max_steps=6, step=0.3, min_step=0.1,
                 recover_epochs=10, recover_rounds=2, taylor_batches=2)
    # MTZ's per-layer budget search (retraining after every trial) was half of --quick's time.
    mtz = {"retrain_steps": 20, "search_steps": 1}
    return replace(BenchConfig(dataset=dataset, seeds=(0, 1), zoo_epochs=15, prune=pc, merger_options={"mtz": mtz}),
                   **overrides)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _merger_options(cfg: BenchConfig, name: str, epochs: int) -> dict[str, Any]:
    opts = dict(cfg.merger_options.get(name, {}))
    if name == "shared" and "train" not in opts:  # the trunk gets the zoo's training length
        opts["train"] = TrainConfig(epochs=epochs, progress=False)
    return opts


def run_seed(
    cfg: BenchConfig, splits: Splits, seed: int, mergers: Sequence[str], log: Callable[[str], None]
) -> list[dict[str, Any]]:
    pre = splits.preprocessing
    arch = create_arch(cfg.arch, in_channels=pre.channels, input_size=tuple(pre.size))
    # Epoch counts are set for the ~1,100-image digits splits; larger training sets get proportionally
    # fewer epochs (about the same number of gradient steps), so composite fits the time budget.
    scale = min(1.0, REFERENCE_TRAIN_SIZE / len(splits.train))
    epochs = max(1, round(cfg.zoo_epochs * scale))
    pcfg = replace(cfg.prune, seed=seed, finetune_epochs=max(1, round(cfg.prune.finetune_epochs * scale)),
                   retry_epochs=max(1, round(cfg.prune.retry_epochs * scale)) if cfg.prune.retry_epochs else 0,
                   recover_epochs=max(1, round(cfg.prune.recover_epochs * scale)))
    nets = [
        train_single_task(t, arch, splits.train, TrainConfig(epochs=epochs, seed=seed, progress=False))
        for t in splits.tasks
    ]
    checks = check_set(splits.val, pcfg.check_shifts, seed)
    ref = reference_accuracy(nets, checks)
    ref_test: dict[str, float] = {}
    for net in nets:
        ref_test.update(evaluate(net, splits.test.select_tasks(net.task_names)))
    rows: list[dict[str, Any]] = []
    for name in mergers:
        t0 = time.perf_counter()
        try:
            merger = create_merger(name, **_merger_options(cfg, name, epochs))
            result = merge_and_prune(merger, nets, splits, pcfg, ref, seed=seed, log=log)
            merged_cost, pruned = result.merged_costs, result.pruned
        except (MergingError, RuntimeError, ValueError) as e:
            # One broken merger must not sink the others' measurements; the report lists it.
            log(f"  seed {seed} {name:>10}: FAILED: {type(e).__name__}: {e}")
            rows.append({"dataset": splits.name, "merger": name, "seed": seed, "error": f"{type(e).__name__}: {e}"})
            continue
        t2 = time.perf_counter()
        test_acc = evaluate(pruned, splits.test)
        check_acc = evaluate(pruned, checks)
        ok = within_budget(check_acc, ref, pcfg.budget)
        pruned_flag = not result.missed_budget
        retries = f", {len(result.attempts)} merges" if len(result.attempts) > 1 else ""
        log(f"  seed {seed} {name:>10}: all-task MACs {merged_cost[combination_name(pruned.task_names)].macs:,} -> "
            f"{cost_table(pruned)[combination_name(pruned.task_names)].macs:,}  within budget: {ok}  "
            f"({t2 - t0:.1f}s merge + prune{retries})")
        for combo, cost in cost_table(pruned).items():
            tasks = combo.split("+")
            rows.append({
                "dataset": splits.name, "merger": name, "combination": combo, "seed": seed,
                "macs": cost.macs, "params": cost.params, "macs_merged": merged_cost[combo].macs,
                "accuracy": {t: test_acc[t] for t in tasks},
                "check_accuracy": {t: check_acc[t] for t in tasks},
                "reference_accuracy": {t: ref_test[t] for t in tasks},
                "reference_check_accuracy": {t: ref[t] for t in tasks},
                "within_budget": ok, "pruned": pruned_flag, "merge_attempts": len(result.attempts),
                "final_merger": result.attempts[-1]["merger"],
                "seconds": round(t2 - t0, 2),
            })
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per seed: limit of sharing, ratio to PAM, PAM's sharing efficiency (in place)."""
    rows = [r for r in rows if "error" not in r]
    by = {(r["seed"], r["merger"], r["combination"]): r for r in rows}
    for r in rows:
        seed, combo = r["seed"], r["combination"]
        singles = [by.get((seed, BASELINE, t)) for t in combo.split("+")]
        if all(singles):
            r["limit"] = max(s["macs"] for s in singles if s)
        pam = by.get((seed, REFERENCE, combo))
        if pam:
            r["ratio_to_pam"] = r["macs"] / pam["macs"]
        if r["merger"] == REFERENCE and "limit" in r:
            r["sharing_efficiency"] = r["macs"] / r["limit"]


def median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [r for r in rows if "error" not in r]
    out: list[dict[str, Any]] = []
    keys = sorted({(r["merger"], r["combination"]) for r in rows}, key=lambda k: (k[0], len(k[1].split("+")), k[1]))
    for merger, combo in keys:
        rs = [r for r in rows if r["merger"] == merger and r["combination"] == combo]
        m: dict[str, Any] = {"dataset": rs[0]["dataset"], "merger": merger, "combination": combo, "seed": "median",
                             "seeds": len(rs)}
        for k in ("macs", "params", "macs_merged", "limit", "ratio_to_pam", "sharing_efficiency"):
            vals = [r[k] for r in rs if k in r]
            if vals:
                m[k] = _median(vals)
                m[f"{k}_range"] = [min(vals), max(vals)]
        for k in ("accuracy", "check_accuracy", "reference_accuracy"):
            m[k] = {t: _median([r[k][t] for r in rs]) for t in rs[0][k]}
        m["accuracy_range"] = {t: [min(r["accuracy"][t] for r in rs), max(r["accuracy"][t] for r in rs)]
                               for t in rs[0]["accuracy"]}
        m["within_budget"] = sum(bool(r["within_budget"]) for r in rs)
        m["merge_attempts"] = [r.get("merge_attempts", 1) for r in rs]
        m["fell_back"] = sum(1 for r in rs if r.get("final_merger", merger) != merger)
        out.append(m)
    return out


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # the machine is shared; intra-op threads on tiny convs mostly spin
    known = list_mergers()
    mergers = list(cfg.mergers) or known
    unknown = [m for m in mergers if m not in known]
    if unknown:
        raise MergingError("unknown_merger", f"unknown merger(s) {unknown}; known: {', '.join(known)}")
    for need in (BASELINE, REFERENCE):
        if need not in mergers:
            mergers.insert(0, need)  # the ratios and the limit need both
    first = [BASELINE, "shared", REFERENCE]  # report columns: baselines and PAM first, then the rest
    mergers.sort(key=lambda m: (first.index(m) if m in first else len(first), m))
    splits = load_dataset(cfg.dataset, split_seed=cfg.split_seed)
    if cfg.tasks:
        for part in ("train", "val", "test"):
            setattr(splits, part, getattr(splits, part).select_tasks(cfg.tasks))
    log(f"bench {cfg.dataset}: {len(splits.tasks)} tasks, mergers {', '.join(mergers)}, seeds {list(cfg.seeds)}")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for seed in tqdm(cfg.seeds, desc=f"bench {cfg.dataset}", disable=None if cfg.progress else True):
        rows.extend(run_seed(cfg, splits, seed, mergers, log))
    add_ratios(rows)
    rows.extend(median_rows(rows))
    elapsed = time.perf_counter() - start
    write_results(cfg, rows, mergers, elapsed)
    log(f"bench {cfg.dataset} done in {elapsed / 60:.1f} min -> {cfg.out_dir}/bench-{cfg.dataset}.{{json,md,png}}")
    return rows


# ---------------------------------------------------------------------- reporting
def _fmt_range(v: float, r: Sequence[float], fmt: str) -> str:
    return f"{v:{fmt}} [{r[0]:{fmt}}-{r[1]:{fmt}}]"


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]], mergers: Sequence[str], elapsed: float) -> str:
    med = {(r["merger"], r["combination"]): r for r in rows if r["seed"] == "median"}
    combos = [c for (m, c) in med if m == REFERENCE]
    tasks = sorted(c for c in combos if "+" not in c)
    seeds = sorted({r["seed"] for r in rows if r["seed"] != "median"})
    lines = [
        f"# Benchmark: {cfg.dataset}",
        "",
        f"Mergers {', '.join(mergers)}; seeds {seeds}; zoo {cfg.arch} trained {cfg.zoo_epochs} epochs per seed; "
        f"same pruner for all (budget {cfg.prune.budget} point(s) per task on val + {cfg.prune.check_shifts} shifted "
        f"copies, criterion {cfg.prune.criterion}, cost-aware {cfg.prune.cost_aware}, step {cfg.prune.step}, "
        f"fine-tune {cfg.prune.finetune_epochs} epochs). Wall time {elapsed / 60:.1f} min.",
        "",
        "Medians over seeds, [min-max] in brackets. MACs per combination after pruning; *limit* = "
        "max over t in C of c_sep(t); *eff* = c_pam(C) / limit (1.0 = PAM costs what the costliest task alone costs).",
        "",
    ]
    others = [m for m in mergers if m != REFERENCE]
    head = ["combination", "limit", *[f"{m} MACs" for m in mergers], *[f"{m}/pam" for m in others], "pam eff"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in combos:
        cells = [c, f"{med[(REFERENCE, c)].get('limit', float('nan')):,.0f}"]
        cells += [f"{med[(m, c)]['macs']:,.0f}" if (m, c) in med else "-" for m in mergers]
        for m in others:
            r = med.get((m, c))
            ok = r is not None and "ratio_to_pam" in r
            cells.append(_fmt_range(r["ratio_to_pam"], r["ratio_to_pam_range"], ".2f") if r and ok else "-")
        p = med[(REFERENCE, c)]
        cells.append(_fmt_range(p["sharing_efficiency"], p["sharing_efficiency_range"], ".2f")
                     if "sharing_efficiency" in p else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy per task (median [min-max]); *single* = the unpruned single-task network; "
              "*in budget* = seeds whose pruned network met the budget on the validation check set.", ""]
    head = ["task", "single", *mergers]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        cells = [t, f"{med[(REFERENCE, t)]['reference_accuracy'][t]:.2f}"]
        for m in mergers:
            r = med.get((m, t))
            cells.append(_fmt_range(r["accuracy"][t], r["accuracy_range"][t], ".2f") if r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    budget = {m: med[(m, tasks[0])]["within_budget"] for m in mergers if (m, tasks[0]) in med}
    lines += ["", "In budget (seeds): " + ", ".join(f"{m} {v}/{len(seeds)}" for m, v in budget.items()), ""]
    regrown = {m: sum(a > 1 for a in med[(m, tasks[0])]["merge_attempts"]) for m in mergers if (m, tasks[0]) in med}
    if any(regrown.values()):
        fell = {m: med[(m, tasks[0])]["fell_back"] for m in regrown}
        lines += ["Merged again with more capacity after missing the budget before pruning (seeds): "
                  + ", ".join(f"{m} {v}" + (f" (of which {fell[m]} fell back to keeping the networks apart)"
                                            if fell[m] else "") for m, v in regrown.items() if v)
                  + " (`merging.pipeline`).", ""]
    for r in rows:
        if "error" in r:
            lines.append(f"- **{r['merger']} failed on seed {r['seed']}**: {r['error']}")
    lines += ["", "## Targets (as measured, medians)", ""]
    missed = {m: len(seeds) - v for m, v in budget.items() if v < len(seeds)}
    if missed:
        lines.append("**Caution:** " + ", ".join(f"{m} missed the accuracy budget on {k}/{len(seeds)} seed(s)"
                                                  for m, k in missed.items())
                     + "; those networks were left unpruned or stopped above the budget's accuracy loss, so "
                       "their MACs are not costs *at the same accuracy*.")
        lines.append("")
    eff = [med[(REFERENCE, c)].get("sharing_efficiency", float("inf")) for c in combos]
    single_ratio = [med[(REFERENCE, t)]["macs"] / med[(BASELINE, t)]["macs"] for t in tasks]
    full = combination_name(tasks)
    lines.append(f"- max sharing efficiency over combinations: {max(eff):.2f} (target <= 1.10)")
    lines.append(f"- max c_pam(t) / c_sep(t) over single tasks: {max(single_ratio):.2f} (target <= 1.10)")
    lines.append(f"- separate/pam on {full}: {med[(BASELINE, full)]['ratio_to_pam']:.2f}")
    if any(m == "shared" for m in mergers):
        sr = [med[("shared", t)]["ratio_to_pam"] for t in tasks]
        lines.append(f"- min shared/pam over single tasks: {min(sr):.2f} (target > 1)")
    worst = min(
        med[(REFERENCE, t)]["accuracy"][t] - med[(REFERENCE, t)]["reference_accuracy"][t] for t in tasks
    )
    lines.append(f"- worst PAM test-accuracy change vs single-task: {worst:+.2f} points (target >= -1.0)")
    return "\n".join(lines) + "\n"


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
    cfg = BenchConfig(dataset=c["dataset"], seeds=tuple(c["seeds"]), arch=c["arch"], zoo_epochs=c["zoo_epochs"],
                      prune=PruneConfig(**c["prune"]), out_dir=json_path.parent)
    rows = load_rows(json_path)
    md = markdown(cfg, rows, meta["mergers"], meta["seconds"])
    atomic_write_bytes(json_path.with_suffix(".md"), md.encode())
    plot(cfg, rows, meta["mergers"], json_path.with_suffix(".png"))


def write_results(cfg: BenchConfig, rows: list[dict[str, Any]], mergers: Sequence[str], elapsed: float) -> None:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.out_dir / f"bench-{cfg.dataset}"
    atomic_write_json(stem.with_suffix(".json"), rows)
    md = markdown(cfg, rows, mergers, elapsed)
    atomic_write_bytes(stem.with_suffix(".md"), md.encode())
    plot(cfg, rows, mergers, stem.with_suffix(".png"))
    config = asdict(cfg)
    config["out_dir"] = str(cfg.out_dir)
    atomic_write_json(stem.with_suffix(".config.json"), {"config": config, "mergers": list(mergers),
                                                         "seconds": round(elapsed, 1)})


def load_rows(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text()))


def summary_nets(nets: Sequence[MultitaskNet]) -> str:  # pragma: no cover - debugging helper
    return ", ".join(f"{n.task_names}:{n.layout}" for n in nets)
