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
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
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
from merging.parallel import run_jobs
from merging.pipeline import MergePruneResult, merge_and_prune, never_dearer
from merging.pruning import PruneConfig, assess, check_set, missed_at_start, reference_accuracy
from merging.references import ROUTES, WIDTH_GRID, TpSchedule, alone, specialist
from merging.tasks import all_combinations, combination_name
from merging.train import TrainConfig, correctness, evaluate, train_single_task

BASELINE = "separate"
ZOO_EPOCHS = {"glyphs": 15}  # zoo epochs of data sets that set their own (glyphs: its 85-97% accuracy band)
REFERENCE_TRAIN_SIZE = 1078  # digits' training split, for which the epoch counts are set
REFERENCE = "pam"
SPEC = "spec"  # pseudo-merger rows: the specialist limit c_spec(C) (c_alone(t) for a single task)
ALONE = "alone"  # rows of the three c_alone routes per task


# The same pruner for every route, every reference and every specialist: the library's schedule made
# coarser (15% steps down to 4%, 3+3 epochs, 6 final) so that 3 data sets x several seeds x 6 routes
# fit on 2 cores; the budget test is the library's (1 point, one-sided 90%).
BENCH_PRUNE = PruneConfig(step=0.15, min_step=0.04, max_steps=24, finetune_epochs=3, retry_epochs=3, final_epochs=6,
                          taylor_batches=4, progress=False)
BENCH_TP = TpSchedule(iterative_steps=16, pruning_ratio=0.95, finetune_epochs=3, retry_epochs=3)


def schedule_for(cfg: PruneConfig, splits: Splits, seed: int) -> PruneConfig:
    """``cfg`` for this data set: its epoch counts are set for digits' ~1,100 training images, so on a
    larger training split a fine-tuning "epoch" is that many samples (the same gradient steps)."""
    samples = REFERENCE_TRAIN_SIZE if len(splits.train) > REFERENCE_TRAIN_SIZE else None
    return replace(cfg, seed=seed, epoch_samples=samples)


@dataclass(frozen=True)
class BenchConfig:
    dataset: str = "digits"  # digits | digits-partitions | composite (or any registered data set)
    tasks: tuple[str, ...] = ()  # subset of the data set's tasks (empty: all)
    mergers: tuple[str, ...] = ()  # empty: every registered merger
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # each seed trains its own zoo, merges and prunes
    arch: str = "lenet"  # architecture family of the zoo
    width_mult: float = 1.0  # the family's width multiplier
    zoo_epochs: int = 40  # training epochs of each single-task network (and of the shared trunk)
    split_seed: int = 0  # train/val/test split of the data set
    prune: PruneConfig = field(default_factory=lambda: BENCH_PRUNE)
    merger_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-merger keyword options
    routes: tuple[str, ...] = ROUTES  # c_alone routes: project | torch-pruning | width-grid
    tp_schedule: TpSchedule = field(default_factory=lambda: BENCH_TP)  # route (b)'s schedule
    width_grid: tuple[float, ...] = WIDTH_GRID  # route (c)'s width multipliers
    spec_sizes: tuple[int, ...] = (2, -1)  # combination sizes with a specialist network (-1: all tasks)
    out_dir: Path = Path("results")  # where bench-<dataset>.{json,md,png} go
    progress: bool = True
    workers: int | None = None  # processes for a seed's independent jobs (None: one per core)
    dataset_args: dict[str, Any] = field(default_factory=dict)  # load_dataset options (the user's folder/CelebA)

    @property
    def stem(self) -> str:
        """Result file stem: ``bench-<dataset>`` for the LeNet zoo, else with the family and width."""
        if self.arch == "lenet" and self.width_mult == 1.0:
            return f"bench-{self.dataset}"
        return f"bench-{self.dataset}-{self.arch}" + ("" if self.width_mult == 1.0 else f"-w{self.width_mult:g}")


def quick_config(dataset: str, **overrides: Any) -> BenchConfig:
    """The CI mode: 2 seeds, shorter training, coarser pruning steps, a lighter MTZ search, the
    all-task specialist only."""
    pc = replace(BENCH_PRUNE, finetune_epochs=1, retry_epochs=1, final_epochs=3, max_steps=6, step=0.3, min_step=0.1,
                 recover_epochs=10, recover_rounds=2, taylor_batches=2)
    # MTZ's per-layer budget search (retraining after every trial) was half of --quick's time.
    mtz = {"retrain_steps": 20, "search_steps": 1}
    tp_quick = TpSchedule(iterative_steps=4, pruning_ratio=0.8, finetune_epochs=1, retry_epochs=1)
    return replace(BenchConfig(dataset=dataset, seeds=(0, 1), zoo_epochs=15, prune=pc, merger_options={"mtz": mtz},
                               tp_schedule=tp_quick, width_grid=(0.25, 0.5, 1.0), spec_sizes=(-1,)),
                   **overrides)


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


def _merger_options(cfg: BenchConfig, name: str, epochs: int) -> dict[str, Any]:
    opts = dict(cfg.merger_options.get(name, {}))
    if name == "shared" and "train" not in opts:  # the trunk gets the zoo's training length
        opts["train"] = TrainConfig(epochs=epochs, progress=False)
    return opts


def spec_combinations(tasks: Sequence[str], sizes: Sequence[int]) -> list[tuple[str, ...]]:
    """The combinations of two or more tasks that get a specialist network (singles use c_alone)."""
    n = len(tasks)
    want = {n if k == -1 else k for k in sizes}
    return [c for c in all_combinations(tasks) if len(c) >= 2 and len(c) in want]


REGROUP = "+regroup"  # route suffix: the same merger, pruned with regrouping (PruneConfig.regroup)


CHAIN_ONLY = ("mtz",)  # mergers that walk layers as a chain (regrouping does too: every +regroup route)


def split_route(name: str) -> tuple[str, bool]:
    """``"pam+regroup"`` -> ("pam", True); ``"pam"`` -> ("pam", False)."""
    return (name[: -len(REGROUP)], True) if name.endswith(REGROUP) else (name, False)


class _SeedRun:
    """One seed of the benchmark: zoo, references, specialists, mergers; every row it records."""

    def __init__(self, cfg: BenchConfig, splits: Splits, seed: int, log: Callable[[str], None]) -> None:
        self.cfg, self.splits, self.seed, self.log = cfg, splits, seed, log
        pre = splits.preprocessing
        self.arch = create_arch(cfg.arch, in_channels=pre.channels, input_size=tuple(pre.size),
                                width_mult=cfg.width_mult)
        # Epoch counts are set for the ~1,100-image digits splits; on larger training sets a fine-tuning
        # "epoch" is that many samples (the same number of gradient steps), and the zoo trains
        # proportionally fewer epochs, unless its data set names its own (ZOO_EPOCHS).
        scale = min(1.0, REFERENCE_TRAIN_SIZE / len(splits.train))
        self.epochs = ZOO_EPOCHS.get(splits.name, max(1, round(cfg.zoo_epochs * scale)))
        self.pcfg = schedule_for(cfg.prune, splits, seed)
        self.tp = cfg.tp_schedule
        self.train_cfg = TrainConfig(epochs=self.epochs, seed=seed, progress=False)
        self.rows: list[dict[str, Any]] = []
        self.checks = check_set(splits.val, self.pcfg.check_shifts, seed)

    def run(self, mergers: Sequence[str]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        self.nets = run_jobs(train_single_task, [(t, self.arch, self.splits.train, self.train_cfg)
                                                 for t in self.splits.tasks], self.cfg.workers)
        self.ref = reference_accuracy(self.nets, self.checks)
        self.ref_test: dict[str, float] = {}
        for net in self.nets:
            self.ref_test.update(evaluate(net, self.splits.test.select_tasks(net.task_names)))
        self.timing = {"zoo": time.perf_counter() - t0}
        t0 = time.perf_counter()
        best = self.references()
        self.timing["alone"] = time.perf_counter() - t0
        # No merging, as strong as it gets: each task's smallest network within budget (c_alone).
        self.separate = create_merger(BASELINE).merge(best, self.splits.train, seed=self.seed)
        self.separate.meta["routes"] = {n.task_names[0]: n.meta.get("route", "project") for n in best}
        t0 = time.perf_counter()
        # The specialists and every merger's route are independent: side by side on the cores.
        combos = spec_combinations(self.splits.train.task_names, self.cfg.spec_sizes)
        routes = [m for m in mergers if m != BASELINE]
        jobs = [("route", self, name) for name in routes] + [("spec", self, combo) for combo in combos]
        done = run_jobs(_seed_job, jobs, self.cfg.workers)
        self.timing["spec+routes"] = time.perf_counter() - t0
        for (kind, _, what), (out, seconds) in zip(jobs, done, strict=True):
            self.timing[f"{kind} {what if isinstance(what, str) else combination_name(what)}"] = seconds
            if kind == "spec":
                self.record_specialist(what, *out)
            else:
                self.record_route(str(what), out)
        if BASELINE in mergers:
            self.record(BASELINE, self.separate, merged=self.separate)
        for r in self.rows:
            r.setdefault("seconds_seed", {k: round(v, 1) for k, v in self.timing.items()})
        return self.rows

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["log"] = print  # a worker process logs to its own stdout
        return state

    def references(self) -> list[MultitaskNet]:
        """c_alone for every task (three routes, the tasks side by side); returns each task's winning network."""
        best: list[MultitaskNet] = []
        jobs = [(net, self.splits, self.pcfg, self.ref, self.train_cfg, self.cfg.routes, self.tp, self.cfg.width_grid)
                for net in self.nets]
        for res in run_jobs(alone, jobs, self.cfg.workers):
            res.net.meta["route"] = res.best
            best.append(res.net)
            t = res.task
            self.log(f"  seed {self.seed} c_alone({t}) = {res.c_alone:,} ({res.best}); routes "
                     + ", ".join(f"{r} {m:,}" if m is not None else f"{r} -" for r, m in res.macs.items()))
            row = self.record(SPEC, res.net, only=(t,))[0]
            row.update({"route": res.best, "routes": res.macs, "route_widths": res.widths})
            self.rows.append({"dataset": self.splits.name, "merger": ALONE, "combination": t, "seed": self.seed,
                              "routes": res.macs, "route_widths": res.widths, "best_route": res.best,
                              "macs": res.c_alone, "c_alone": res.c_alone})
        return best

    def specialist(self, combo: Sequence[str]) -> tuple[MultitaskNet, list[dict[str, Any]]]:
        by_task = {n.task_names[0]: n for n in self.nets}
        return specialist([by_task[t] for t in combo], self.splits.train, self.splits, self.pcfg, self.ref,
                          self.train_cfg, seed=self.seed)

    def record_specialist(self, combo: Sequence[str], pruned: MultitaskNet, history: list[dict[str, Any]]) -> None:
        if missed_at_start(history):
            self.log(f"  seed {self.seed} spec {combination_name(combo)}: the jointly trained trunk misses the "
                     "budget before pruning; no specialist figure")
            return
        self.record(SPEC, pruned, only=(combination_name(combo),))

    def merge_and_prune(self, name: str) -> MergePruneResult | str:
        """The route's result, or why it failed (one broken merger must not sink the others)."""
        base, regroup = split_route(name)
        try:
            merger = create_merger(base, **_merger_options(self.cfg, base, self.epochs))
            pcfg = replace(self.pcfg, regroup=regroup)
            return merge_and_prune(merger, self.nets, self.splits, pcfg, self.ref, seed=self.seed, log=self.log)
        except (MergingError, RuntimeError, ValueError) as e:
            return f"{type(e).__name__}: {e}"

    def record_route(self, name: str, result: MergePruneResult | str) -> None:
        if isinstance(result, str):
            self.log(f"  seed {self.seed} {name:>10}: FAILED: {result}")
            self.rows.append({"dataset": self.splits.name, "merger": name, "seed": self.seed, "error": result})
            return
        own = cost_table(result.pruned)  # the route's own pruned network, before the never-dearer rule
        result = never_dearer(result, self.separate, log=self.log)
        extra = {"pruned": not result.missed_budget, "merge_attempts": len(result.attempts),
                 "final_merger": result.attempts[-1]["merger"], "shipped": result.chose,
                 "own_macs": {c: k.macs for c, k in own.items()}}
        self.record(name, result.pruned, merged=result.merged, extra=extra)

    def record(
        self, name: str, net: MultitaskNet, merged: MultitaskNet | None = None, only: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """One row per combination of ``net`` (or the combinations ``only``) with cost and accuracy."""
        tasks = net.task_names
        test_correct = correctness(net, self.splits.test.select_tasks(tasks))
        verdict = assess(net, self.checks.select_tasks(tasks), self.ref, self.pcfg.budget, self.pcfg.confidence)
        n_test = len(self.splits.test)
        table = cost_table(net)
        merged_table = cost_table(merged) if merged is not None else {}
        full = combination_name(tasks)
        out: list[dict[str, Any]] = []
        for combo, cost in table.items():
            if only is not None and combo not in only:
                continue
            ts = combo.split("+")
            row = {
                "dataset": self.splits.name, "merger": name, "combination": combo, "seed": self.seed,
                "macs": cost.macs, "params": cost.params,
                "accuracy": {t: 100.0 * float(test_correct[t].mean()) for t in ts},
                "accuracy_ci95": {t: wilson(float(test_correct[t].sum()), n_test) for t in ts},
                "check_accuracy": {t: verdict.accuracy[t] for t in ts},
                "check_drop_upper": {t: verdict.upper[t] for t in ts},
                "reference_accuracy": {t: self.ref_test[t] for t in ts},
                "reference_check_accuracy": {t: self.ref[t] for t in ts},
                "within_budget": all(t not in verdict.failing for t in ts),
                "within_budget_all": verdict.ok,
            }
            if combo in merged_table:
                row["macs_merged"] = merged_table[combo].macs
            row.update(extra or {})
            out.append(row)
        if out and name != SPEC:
            self.log(f"  seed {self.seed} {name:>10}: all-task MACs {table[full].macs:,}  within budget: {verdict.ok}")
        self.rows.extend(out)
        return out


def _seed_job(kind: str, run: _SeedRun, what: Any) -> tuple[Any, float]:
    """One independent job of a seed (in a worker process): a route or a specialist; (result, seconds)."""
    t0 = time.perf_counter()
    out = run.specialist(what) if kind == "spec" else run.merge_and_prune(what)
    return out, time.perf_counter() - t0


def run_seed(
    cfg: BenchConfig, splits: Splits, seed: int, mergers: Sequence[str], log: Callable[[str], None]
) -> list[dict[str, Any]]:
    return _SeedRun(cfg, splits, seed, log).run(mergers)


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
        m: dict[str, Any] = {"dataset": rs[0]["dataset"], "merger": merger, "combination": combo, "seed": "median",
                             "seeds": len(rs)}
        for k in ("macs", "params", "macs_merged", "limit", "c_spec", *RATIOS):
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


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # the machine is shared; intra-op threads on tiny convs mostly spin
    known = list_mergers()
    mergers = list(cfg.mergers) or [*known, *(f"{m}{REGROUP}" for m in ("shared", REFERENCE))]
    if not create_arch(cfg.arch).is_chain:
        # MTZ and regrouping walk layers as a chain; PAM, separate and shared follow the group graph
        chain_only = [m for m in mergers if split_route(m)[0] in CHAIN_ONLY or split_route(m)[1]]
        if cfg.mergers and chain_only:
            raise MergingError("unsupported_arch", f"{', '.join(chain_only)} cannot run on {cfg.arch} networks: MTZ "
                               "and regrouping walk layers as a chain (no skip additions or depthwise convs, see "
                               "docs/graph.md); choose among separate, shared and pam")
        mergers = [m for m in mergers if m not in chain_only]
    unknown = [m for m in mergers if split_route(m)[0] not in known]
    if unknown:
        raise MergingError("unknown_merger", f"unknown merger(s) {unknown}; known: {', '.join(known)}")
    for need in (BASELINE, REFERENCE):
        if need not in mergers:
            mergers.insert(0, need)  # the ratios and the limit need both
    first = [BASELINE, "shared", REFERENCE, "mtz"]  # report columns: baselines and PAM first, then the rest
    mergers.sort(key=lambda m: (split_route(m)[1], first.index(split_route(m)[0]) if split_route(m)[0] in first
                                else len(first), m))
    splits = load_dataset(cfg.dataset, split_seed=cfg.split_seed, **cfg.dataset_args)
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
    from merging import distributed

    if distributed.is_main():  # under torchrun every rank computed the same rows; one writes them
        write_results(cfg, rows, mergers, elapsed)
        log(f"bench {cfg.dataset} done in {elapsed / 60:.1f} min -> {cfg.out_dir}/{cfg.stem}.{{json,md,png}}")
    distributed.barrier()
    return rows


# ---------------------------------------------------------------------- reporting
def _fmt_range(v: float, r: Sequence[float], fmt: str) -> str:
    return f"{v:{fmt}} [{r[0]:{fmt}}-{r[1]:{fmt}}]"


def _cell(r: Mapping[str, Any] | None, key: str, fmt: str = ".2f") -> str:
    if not r or key not in r:
        return "-"
    return _fmt_range(r[key], r[f"{key}_range"], fmt)


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
        vals = [by[(s, route, combo)]["macs"] / max(1, by[(s, other, combo)]["macs"]) for s in seeds
                if (s, route, combo) in by and (s, other, combo) in by]
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
        acc = [_median([by[(s, m, t)]["accuracy"][t] - by[(s, m, t)]["reference_accuracy"][t] for s in seeds
                        if (s, m, t) in by]) for t in tasks if any((s, m, t) in by for s in seeds)]
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
    """The route whose worst combination is closest to the specialist limit."""
    scored = {m: v["worst_over_spec"] for m, v in summary.items() if "worst_over_spec" in v}
    return min(scored, key=lambda m: (scored[m], m)) if scored else None


def markdown(cfg: BenchConfig, rows: list[dict[str, Any]], mergers: Sequence[str], elapsed: float) -> str:
    med = {(r["merger"], r["combination"]): r for r in rows if r["seed"] == "median"}
    combos = [c for (m, c) in med if m == REFERENCE]
    tasks = sorted(c for c in combos if "+" not in c)
    seeds = sorted({r["seed"] for r in rows if r["seed"] != "median"})
    pc = cfg.prune
    width = f" (width x{cfg.width_mult:g})" if cfg.width_mult != 1.0 else ""
    zoo = ZOO_EPOCHS.get(cfg.dataset, f"{cfg.zoo_epochs} (fewer on a training split above {REFERENCE_TRAIN_SIZE:,})")
    lines = [
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
    others = [m for m in mergers if m != REFERENCE]
    head = ["combination", "spec", "limit", *[f"{m} MACs" for m in mergers], *[f"{m}/pam" for m in others],
            *[f"{m}/spec" for m in mergers]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in combos:
        spec = med.get((SPEC, c))
        cells = [c, f"{spec['macs']:,.0f}" if spec else "-", f"{med[(REFERENCE, c)].get('limit', float('nan')):,.0f}"]
        cells += [f"{med[(m, c)]['macs']:,.0f}" if (m, c) in med else "-" for m in mergers]
        cells += [_cell(med.get((m, c)), "ratio_to_pam") for m in others]
        cells += [_cell(med.get((m, c)), "ratio_to_spec") for m in mergers]
        lines.append("| " + " | ".join(cells) + " |")
    alone_rows = [r for r in rows if r["merger"] == ALONE]
    if alone_rows:
        routes = list(alone_rows[0]["routes"])
        lines += ["", "c_alone routes per task (median MACs of each route's smallest network within budget; "
                  "*wins* = seeds where the route was the smallest; *project/alone* = median of per-seed ratios):", ""]
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
            cells += [f"{_median([r['macs'] for r in rs]):,.0f}",
                      ", ".join(f"{k} {v}" for k, v in wins.items() if v),
                      _fmt_range(_median(ratios), [min(ratios), max(ratios)], ".2f") if ratios else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Test accuracy per task (median [min-max] over seeds; the last column: the Wilson 95% interval "
              "of PAM's median seed); *single* = the unpruned single-task network.", ""]
    shown = [*mergers, SPEC]
    head = ["task", "single", *shown, "pam 95% CI (one seed)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        cells = [t, f"{med[(REFERENCE, t)]['reference_accuracy'][t]:.2f}"]
        for m in shown:
            r = med.get((m, t))
            cells.append(_fmt_range(r["accuracy"][t], r["accuracy_range"][t], ".2f") if r else "-")
        pam_rows = sorted((r for r in rows if r["merger"] == REFERENCE and r["combination"] == t
                           and r["seed"] != "median"), key=lambda r: r["accuracy"][t])
        if pam_rows:
            lo, hi = pam_rows[len(pam_rows) // 2]["accuracy_ci95"][t]
            cells.append(f"{lo:.1f}-{hi:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    budget = {m: med[(m, tasks[0])]["within_budget"] for m in shown if (m, tasks[0]) in med}
    lines += ["", "In budget on the check set (seeds, first task): "
              + ", ".join(f"{m} {v}/{len(seeds)}" for m, v in budget.items())]
    hit, total = budget_miss_share(rows)
    lines += [f"Networks within budget on the check set that lose more than 1 point on test: {hit}/{total} "
              f"({100.0 * hit / max(1, total):.0f}%; per seed, merger or reference, and task).", ""]
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
    per_seed = {r["seed"]: r["seconds_seed"] for r in rows if r["seed"] != "median" and "seconds_seed" in r}
    if per_seed:
        parts = {k: sum(t.get(k, 0.0) for t in per_seed.values()) for k in next(iter(per_seed.values()))}
        lines += ["", "Time split (all seeds): " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in parts.items()), ""]
    lines += ["", "## Targets (as measured, medians of per-seed ratios)", ""]
    full = combination_name(tasks)
    if alone_rows:
        worst = max((_median([r["routes"]["project"] / r["macs"] for r in alone_rows
                              if r["combination"] == t and r["routes"].get("project")] or [float("inf")]), t)
                    for t in tasks)
        lines.append(f"- project pruner / c_alone, worst task: {worst[0]:.2f} ({worst[1]}) (target <= 1.05)")
    share = 100.0 * hit / max(1, total)
    lines.append(f"- within-budget networks losing > 1 point on test: {share:.0f}% (target <= 5%)")
    for m in mergers:
        spec_ratios = [(med[(m, c)]["ratio_to_spec"], c) for c in combos
                       if "ratio_to_spec" in med.get((m, c), {})]
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
    summary = route_summary(rows, mergers)
    if summary:
        lines += ["", "Routes (merger, `+regroup` = pruned with regrouping), medians over seeds of per-seed ratios: "
                  "*worst/spec* = max over benchmarked C of c_route(C)/c_spec(C) (target <= 1.10); *single/shared* = "
                  "max over single tasks (target < 1); *all/shared* (target <= 1.05); *separate/route* = min over "
                  "combinations of 2+ tasks (target > 1); *mtz/route* max and min (targets >= 2.01 and >= 0.95); "
                  "*acc* = worst median test-accuracy change (target >= -1.0).", ""]
        head = ["route", "worst/spec", "single/shared", "all/shared", "separate/route", "mtz/route max",
                "mtz/route min", "acc"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        keys = ["worst_over_spec", "worst_single_over_shared", "all_over_shared", "min_separate_over_route",
                "max_mtz_over_route", "min_mtz_over_route", "worst_accuracy_change"]
        for m, v in summary.items():
            lines.append("| " + " | ".join([m, *(f"{v[k]:.2f}" if k in v else "-" for k in keys)]) + " |")
        b = best_route(summary)
        if b:
            lines += ["", f"Best route (closest to the specialist limit on its worst combination): **{b}**."]
        lines.append("")
    worst_acc = min((med[(REFERENCE, t)]["accuracy"][t] - med[(REFERENCE, t)]["reference_accuracy"][t], t)
                    for t in tasks)
    lines.append(f"- worst PAM median test-accuracy change vs single-task: {worst_acc[0]:+.2f} points ({worst_acc[1]}) "
                 "(target >= -1.0)")
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
        spec = med.get((SPEC, c))
        if spec:
            ax.plot([i], [spec["macs"]], marker="*", color="crimson", markersize=9, linestyle="none",
                    label="c_spec" if not any(med.get((SPEC, cc)) for cc in combos[:i]) else "_nolegend_")
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
    return BenchConfig(dataset=c["dataset"], seeds=tuple(seeds), arch=c["arch"], zoo_epochs=c["zoo_epochs"],
                       width_mult=c.get("width_mult", 1.0), tasks=tuple(c.get("tasks", ())),
                       prune=PruneConfig(**c["prune"]), routes=tuple(c.get("routes", ROUTES)),
                       spec_sizes=tuple(c.get("spec_sizes", (2, -1))), out_dir=out_dir)


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
    atomic_write_json(stem(".config.json"), {"config": config, "mergers": list(mergers),
                                                         "seconds": round(elapsed, 1)})


def load_rows(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text()))


