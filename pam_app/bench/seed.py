"""One seed of ``pam bench``: the zoo, the three ``c_alone`` routes per task, the specialists and every
merger's route (independent jobs side by side on the cores), one row per (route, combination)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from merging.arch import create_arch
from merging.checkpoint import save_model
from merging.cost import combination_cost, cost_table
from merging.data import load_dataset
from merging.data.base import Splits
from merging.errors import MergingError
from merging.mergers import create_merger, list_mergers
from merging.network import MultitaskNet
from merging.parallel import After, run_jobs
from merging.pipeline import REGROUP, MergePruneResult, merge_and_prune, never_dearer, split_route
from merging.pruning import assess, check_set, missed_at_start, reference_accuracy
from merging.references import GRID, ROUTES, alone_route, choose_alone, grid_stopped, specialist
from merging.tasks import combination_name
from merging.train import TrainConfig, correctness, evaluate, train_single_task
from pam_app.bench.files import write_results
from pam_app.bench.rows import add_ratios, median_rows, wilson
from pam_app.bench.schedule import (
    ALONE,
    BASELINE,
    REFERENCE,
    REFERENCE_TRAIN_SIZE,
    SPEC,
    ZOO_EPOCHS,
    BenchConfig,
    _merger_options,
    schedule_for,
    spec_combinations,
    with_schedule,
)


class _SeedRun:
    """One seed of the benchmark: zoo, references, specialists, mergers; every row it records."""

    def __init__(self, cfg: BenchConfig, splits: Splits, seed: int, log: Callable[[str], None]) -> None:
        self.cfg, self.splits, self.seed, self.log = cfg, splits, seed, log
        pre = splits.preprocessing
        self.arch = create_arch(
            cfg.arch, in_channels=pre.channels, input_size=tuple(pre.size), width_mult=cfg.width_mult
        )
        # Epoch counts are set for the ~1,100-image digits splits; on larger training sets a fine-tuning
        # "epoch" is that many samples (the same number of gradient steps), and the zoo trains
        # proportionally fewer epochs, unless its data set names its own (ZOO_EPOCHS).
        scale = min(1.0, REFERENCE_TRAIN_SIZE / len(splits.train))
        self.epochs = ZOO_EPOCHS.get(splits.name, max(1, round(cfg.zoo_epochs * scale)))
        self.pcfg = schedule_for(cfg.prune, splits, seed)
        # c_alone's project route: the routes' budget rule and data scaling, stepping as alone_prune does
        self.acfg = with_schedule(self.pcfg, cfg.alone_prune)
        self.tp = cfg.tp_schedule
        self.train_cfg = TrainConfig(epochs=self.epochs, seed=seed, progress=False)
        self.rows: list[dict[str, Any]] = []
        self.checks = check_set(splits.val, self.pcfg.check_shifts, seed)
        self.caps: dict[int, int | None] = {}  # net index -> the MACs its width grid ran capped at

    def run(self, mergers: Sequence[str]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        self.nets = run_jobs(
            train_single_task,
            [(t, self.arch, self.splits.train, self.train_cfg) for t in self.splits.tasks],
            self.cfg.workers,
        )
        self.ref = reference_accuracy(self.nets, self.checks)
        self.ref_test: dict[str, float] = {}
        for net in self.nets:
            self.ref_test.update(evaluate(net, self.splits.test.select_tasks(net.task_names)))
        self.timing = {"zoo": time.perf_counter() - t0}
        t0 = time.perf_counter()
        # Every c_alone route of every task, every specialist and every merger's route are independent,
        # except the width grid: it waits for the task's other routes and trains no width dearer than the
        # best of them (that width could not win). One pool: the routes (MTZ is the longest job) first, then
        # what the grids wait for, the grids as soon as they can start, the short specialists last, so that
        # neither core idles at a phase boundary.
        combos = spec_combinations(self.splits.train.task_names, self.cfg.spec_sizes)
        routes = [m for m in mergers if m != BASELINE]
        labels: list[tuple[str, Any]] = [("route", name) for name in routes]
        labels += [("alone", (i, r)) for r in self.cfg.routes if r != GRID for i in range(len(self.nets))]
        if GRID in self.cfg.routes:
            labels += [("alone", (i, GRID)) for i in range(len(self.nets))]
        labels += [("spec", combo) for combo in combos]
        jobs = [self._job(k, what, labels) for k, what in labels]
        done = run_jobs(_seed_job, jobs, self.cfg.workers)
        self.timing["routes, specialists, c_alone (wall)"] = time.perf_counter() - t0
        found: dict[int, dict[str, MultitaskNet | None]] = {i: {} for i in range(len(self.nets))}
        for (kind, what), (out, seconds, cap) in zip(labels, done, strict=True):
            if kind == "alone":
                i, route = what
                found[i][route] = out
                if route == GRID:
                    self.caps[i] = cap
                self.timing[f"alone {self.nets[i].task_names[0]} {route}"] = seconds
            else:
                self.timing[f"{kind} {what if isinstance(what, str) else combination_name(what)}"] = seconds
        best = self.references(found)
        # No merging, as strong as it gets: each task's smallest network within budget (c_alone).
        self.separate = create_merger(BASELINE).merge(best, self.splits.train, seed=self.seed)
        self.separate.meta["routes"] = {n.task_names[0]: n.meta.get("route", "project") for n in best}
        for (kind, what), (out, _, _) in zip(labels, done, strict=True):
            if kind == "spec":
                self.record_specialist(what, *out)
            elif kind == "route":
                self.record_route(str(what), out)
        if BASELINE in mergers:
            self.record(BASELINE, self.separate, merged=self.separate)
        self.save(BASELINE, self.separate)
        for r in self.rows:
            r.setdefault("seconds_seed", {k: round(v, 1) for k, v in self.timing.items()})
        return self.rows

    def _job(self, kind: str, what: Any, labels: Sequence[tuple[str, Any]]) -> tuple[Any, ...] | After:
        """The pool job of ``labels``' entry (kind, what); the width grid waits for its task's other routes."""
        if kind != "alone" or what[1] != GRID:
            return (kind, self, what, None)
        i = what[0]
        others = tuple(k for k, (kd, w) in enumerate(labels) if kd == "alone" and w[0] == i and w[1] != GRID)
        return After(others, lambda results: (kind, self, what, grid_cap([results[k][0] for k in others])))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["log"] = print  # a worker process logs to its own stdout
        return state

    def references(self, found: Mapping[int, Mapping[str, MultitaskNet | None]]) -> list[MultitaskNet]:
        """c_alone for every task from its routes' networks (``found``: net index -> route -> network);
        returns each task's winning network."""
        best: list[MultitaskNet] = []
        for i, net in enumerate(self.nets):
            res = choose_alone(net, found[i], self.cfg.routes)
            res.net.meta["route"] = res.best
            best.append(res.net)
            t = res.task
            cap = self.caps.get(i)  # the width grid trained no width dearer than this
            stopped = res.macs.get(GRID, 0) is None and grid_stopped(net, self.cfg.width_grid, cap)
            self.log(
                f"  seed {self.seed} c_alone({t}) = {res.c_alone:,} ({res.best}); routes "
                + ", ".join(f"{r} {m:,}" if m is not None else f"{r} -" for r, m in res.macs.items())
                + (f" (the width grid stopped above {cap:,})" if stopped else "")
            )
            row = self.record(SPEC, res.net, only=(t,))[0]
            row.update({"route": res.best, "routes": res.macs, "route_widths": res.widths})
            self.rows.append(
                {
                    "dataset": self.splits.name,
                    "merger": ALONE,
                    "combination": t,
                    "seed": self.seed,
                    "routes": res.macs,
                    "route_widths": res.widths,
                    "best_route": res.best,
                    "grid_cap": cap,
                    "grid_stopped": stopped,
                    "macs": res.c_alone,
                    "c_alone": res.c_alone,
                }
            )
        return best

    def specialist(self, combo: Sequence[str]) -> tuple[MultitaskNet, list[dict[str, Any]]]:
        by_task = {n.task_names[0]: n for n in self.nets}
        return specialist(
            [by_task[t] for t in combo],
            self.splits.train,
            self.splits,
            self.pcfg,
            self.ref,
            self.train_cfg,
            seed=self.seed,
        )

    def record_specialist(self, combo: Sequence[str], pruned: MultitaskNet, history: list[dict[str, Any]]) -> None:
        if missed_at_start(history):
            self.log(
                f"  seed {self.seed} spec {combination_name(combo)}: the jointly trained trunk misses the "
                "budget before pruning; no specialist figure"
            )
            return
        self.record(SPEC, pruned, only=(combination_name(combo),))

    def merge_and_prune(self, name: str) -> MergePruneResult | str:
        """The route's result, or why it failed (one broken merger must not sink the others)."""
        base, removes = split_route(name)
        try:
            merger = create_merger(base, **_merger_options(self.cfg, base, self.epochs))
            pcfg = replace(self.pcfg, removes=removes)
            return merge_and_prune(merger, self.nets, self.splits, pcfg, self.ref, seed=self.seed, log=self.log)
        except (MergingError, RuntimeError, ValueError) as e:
            return f"{type(e).__name__}: {e}"

    def record_route(self, name: str, result: MergePruneResult | str) -> None:
        if isinstance(result, str):
            self.log(f"  seed {self.seed} {name:>10}: FAILED: {result}")
            self.rows.append({"dataset": self.splits.name, "merger": name, "seed": self.seed, "error": result})
            return
        own_net = result.pruned
        own = cost_table(own_net)  # the route's own pruned network, before the never-dearer rule
        result = never_dearer(result, self.separate, log=self.log)
        extra = {
            "pruned": not result.missed_budget,
            "merge_attempts": len(result.attempts),
            "final_merger": result.attempts[-1]["merger"],
            "shipped": result.chose,
            "own_macs": {c: k.macs for c, k in own.items()},
        }
        self.record(name, result.pruned, merged=result.merged, extra=extra)
        self.save(name, result.pruned)
        if result.pruned is not own_net:  # the route's own network, before the never-dearer rule
            self.save(f"{name}-own", own_net)

    def save(self, name: str, net: MultitaskNet) -> None:
        """``net`` as ``seed<k>-<name>`` under ``cfg.save_models`` (to export or serve it afterwards)."""
        if self.cfg.save_models is None:
            return
        net.meta["preprocessing"] = self.splits.preprocessing.to_json()
        self.cfg.save_models.mkdir(parents=True, exist_ok=True)
        save_model(net, self.cfg.save_models / f"seed{self.seed}-{name}")

    def record(
        self,
        name: str,
        net: MultitaskNet,
        merged: MultitaskNet | None = None,
        only: Sequence[str] | None = None,
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
                "dataset": self.splits.name,
                "merger": name,
                "combination": combo,
                "seed": self.seed,
                "macs": cost.macs,
                "params": cost.params,
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


def grid_cap(others: Sequence[MultitaskNet | None]) -> int | None:
    """The MACs above which the width grid stops: the smallest network the task's other routes found."""
    return min((combination_cost(n).macs for n in others if n is not None), default=None)


def _seed_job(kind: str, run: _SeedRun, what: Any, cap: int | None) -> tuple[Any, float, int | None]:
    """One job of a seed (in a worker process): a route, a specialist or one c_alone route of one task
    (``cap``: the width grid's stop, see ``grid_cap``); (result, seconds, cap)."""
    t0 = time.perf_counter()
    if kind == "spec":
        out: Any = run.specialist(what)
    elif kind == "alone":
        i, route = what
        out = alone_route(run.nets[i], run.splits, run.acfg, run.ref, run.train_cfg, route, run.tp, run.cfg.width_grid,
                          max_macs=cap)
    else:
        out = run.merge_and_prune(what)
    return out, time.perf_counter() - t0, cap


def run_seed(
    cfg: BenchConfig, splits: Splits, seed: int, mergers: Sequence[str], log: Callable[[str], None]
) -> list[dict[str, Any]]:
    return _SeedRun(cfg, splits, seed, log).run(mergers)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; intra-op threads on tiny convs mostly spin
    try:
        return _run_bench(cfg, log)
    finally:
        torch.set_num_threads(threads)  # the caller's setting again (a test process goes on with it)


def _run_bench(cfg: BenchConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    known = list_mergers()
    mergers = list(cfg.mergers) or [*known, *(f"{m}{REGROUP}" for m in ("shared", REFERENCE))]
    unknown = [m for m in mergers if split_route(m)[0] not in known]
    if unknown:
        raise MergingError("unknown_merger", f"unknown merger(s) {unknown}; known: {', '.join(known)}")
    if set(cfg.routes) - set(ROUTES):
        raise MergingError("unknown_route", f"unknown c_alone route(s) {sorted(set(cfg.routes) - set(ROUTES))}; "
                           f"known: {', '.join(ROUTES)}")
    for need in (BASELINE, REFERENCE):
        if need not in mergers:
            mergers.insert(0, need)  # the ratios and the limit need both
    first = [BASELINE, "shared", REFERENCE, "mtz"]  # report columns: baselines and PAM first, then the rest
    mergers.sort(
        key=lambda m: (
            split_route(m)[1],
            first.index(split_route(m)[0]) if split_route(m)[0] in first else len(first),
            m,
        )
    )
    splits = load_dataset(cfg.dataset, split_seed=cfg.split_seed, **cfg.dataset_args)
    if cfg.tasks:
        for part in ("train", "val", "test"):
            setattr(splits, part, getattr(splits, part).select_tasks(cfg.tasks))
    log(f"bench {cfg.dataset}: {len(splits.tasks)} tasks, mergers {', '.join(mergers)}, seeds {list(cfg.seeds)}")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    from merging import distributed

    done: list[int] = []
    out: list[dict[str, Any]] = []
    for seed in tqdm(cfg.seeds, desc=f"bench {cfg.dataset}", disable=None if cfg.progress else True):
        rows.extend(run_seed(cfg, splits, seed, mergers, log))
        done.append(seed)
        # Written after every seed, as a run of the seeds so far: a run cut short keeps every finished seed
        # (--combine can join them with a later --seed-list); the last seed's write is the whole run.
        out = [dict(r) for r in rows]
        add_ratios(out)
        out.extend(median_rows(out))
        elapsed = time.perf_counter() - start
        if distributed.is_main():  # under torchrun every rank computed the same rows; one writes them
            write_results(replace(cfg, seeds=tuple(done)), out, mergers, elapsed)
            what = "done" if len(done) == len(cfg.seeds) else f"seeds {done} written"
            log(f"bench {cfg.dataset} {what} in {elapsed / 60:.1f} min -> {cfg.out_dir}/{cfg.stem}.{{json,md,png}}")
    distributed.barrier()
    return out
