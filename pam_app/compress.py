"""``pam compress``: any route the benchmark measures, on any data set, from the command line.

A route is ``<merger>[+regroup]``: merge the zoo with the merger (growing the merge while it
misses the budget: the merge ladder), prune with the project's pruner (with regrouping when asked),
and ship the separately pruned networks instead wherever the result would cost more on a
combination of two or more tasks. The pruning runs are independent jobs, run side by side: the
route, and each task's network pruned alone (the ``separate`` baseline the rule compares with).
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

from merging.data.base import Splits
from merging.mergers import create_merger
from merging.network import MultitaskNet
from merging.pipeline import MergePruneResult, merge_and_prune, never_dearer, split_route
from merging.pruning import PruneConfig, prune
from merging.references import specialist
from merging.train import TrainConfig


def job(kind: str, *args: Any) -> Any:
    """One independent pruning job (run in a worker process): ``alone``, ``spec`` or ``route``."""
    if kind == "alone":
        net, splits, cfg, ref = args
        return prune(net, splits, cfg, reference=ref)[0]
    if kind == "spec":
        nets, splits, cfg, ref, epochs, seed = args
        return specialist(nets, splits.train, splits, cfg, ref, TrainConfig(epochs=epochs, progress=False),
                          seed=seed)[0]
    base, nets, splits, cfg, ref, epochs, seed = args
    options = {"train": TrainConfig(epochs=epochs, progress=False)} if base == "shared" else {}
    return merge_and_prune(create_merger(base, **options), nets, splits, cfg, ref, seed=seed, log=print)


def route_jobs(
    route: str, nets: list[MultitaskNet], splits: Splits, cfg: PruneConfig, ref: Any, epochs: int, seed: int,
    with_specialist: bool = False,
) -> list[tuple[Any, ...]]:
    """The route first (the longest job), the all-task specialist if asked, then each task alone, all
    pruned with ``cfg``'s schedule: a route pruned more weakly than the networks it is compared with
    ships ``separate`` for the schedule's sake, not the structure's."""
    base, removes = split_route(route)
    single = replace(cfg, removes="channels", progress=False)
    jobs: list[tuple[Any, ...]] = [("route", base, nets, splits, replace(cfg, removes=removes, progress=False), ref,
                                    epochs, seed)]
    if with_specialist:
        jobs.append(("spec", nets, splits, single, ref, epochs, seed))
    jobs += [("alone", copy.deepcopy(net), splits, single, ref) for net in nets]
    return jobs


def ship(result: MergePruneResult, alone: list[MultitaskNet], splits: Splits) -> tuple[MergePruneResult, MultitaskNet]:
    """The never-dearer rule against the separately pruned networks; (shipped result, separate)."""
    separate = create_merger("separate").merge(alone, splits.train)
    return never_dearer(result, separate, log=print), separate


def cmd_compress(args: argparse.Namespace) -> int:
    from merging.checkpoint import save_model
    from merging.cost import cost_table
    from merging.parallel import run_jobs
    from merging.pruning import check_set, reference_accuracy
    from merging.pruning.budget import resolution_line
    from merging.report import format_table
    from merging.train import evaluate
    from merging.zoo import load_zoo
    from pam_app.bench.schedule import ROUTE_SCHEDULES, schedule_for
    from pam_app.commands_merging import dataset_from_args

    nets = load_zoo(Path(args.zoo))
    args.tasks = ",".join(n.task_names[0] for n in nets)
    splits = dataset_from_args(args)
    cfg = replace(schedule_for(ROUTE_SCHEDULES[args.schedule], splits, args.seed), budget=args.budget)
    checks = check_set(splits.val, cfg.check_shifts, cfg.seed, cfg.shift_below)
    ref = reference_accuracy(nets, checks)
    images = checks.images or len(checks)
    held = round(images * cfg.certify_share)
    print("step decisions: " + resolution_line(images - held, cfg.confidence, cfg.budget))
    if held:
        print("certification: " + resolution_line(held, cfg.confidence, cfg.budget), flush=True)
    out = run_jobs(job, route_jobs(args.route, nets, splits, cfg, ref, args.epochs, args.seed), args.workers)
    result, separate = ship(out[0], out[1:], splits)
    print(f"route {args.route}: {result.chose}; merges tried: "
          + ", ".join(f"{a['merger']} {a['options'].get('min_keep', '')}".strip() for a in result.attempts))
    shipped = result.pruned
    shipped.meta["route"] = args.route
    shipped.meta["test_accuracy"] = evaluate(shipped, splits.test)
    path = save_model(shipped, Path(args.out))
    sep, got = cost_table(separate), cost_table(shipped)
    print(format_table(["combination", "separate MACs", "shipped MACs", "separate/shipped"],
                       [[c, sep[c].macs, got[c].macs, f"{sep[c].macs / max(1, got[c].macs):.2f}x"] for c in sep]))
    print(f"shipped -> {path}")
    return 0
