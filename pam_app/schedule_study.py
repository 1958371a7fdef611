"""Is the benchmark's coarser pruning schedule as strong as the library's finer one?

``python -m pam_app.schedule_study`` (issue 20: "every route within 5% of the MACs the slower schedule
reaches"). For each seed: train the benchmark's zoo (the same networks ``pam bench`` trains for that
seed), then prune every task's network alone with the project's pruner twice, under the same budget
rule and check set: the benchmark's schedule (``BENCH_PRUNE``: 15% steps down to 4%, 3+3 epochs, 6
final) and the library's (``PruneConfig()``: 10% steps down to 2%, 5+5 epochs, 10 final). Reports each
network's MACs, the ratio fast/slow and the time each took. The merged routes are not compared here
(their ladders make one slow-schedule seed take tens of minutes); the single networks are what every
route's ``c_alone`` yardstick and ``separate`` rest on.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from merging.arch import create_arch
from merging.checkpoint import atomic_write_json
from merging.cost import combination_cost
from merging.data import load_dataset
from merging.data.base import Splits
from merging.network import MultitaskNet
from merging.parallel import run_jobs
from merging.pruning import PruneConfig, check_set, missed_at_start, prune, reference_accuracy
from merging.report import format_table
from merging.train import TrainConfig, train_single_task
from pam_app.bench.schedule import BENCH_PRUNE, ZOO_EPOCHS, schedule_for

SCHEDULES = {"bench": BENCH_PRUNE, "library": PruneConfig(progress=False)}


def prune_alone(net: MultitaskNet, splits: Splits, cfg: PruneConfig, ref: dict[str, float]) -> dict[str, Any]:
    """One single-task network pruned alone (a worker job): its MACs and the seconds it took."""
    t0 = time.perf_counter()
    pruned, history = prune(copy.deepcopy(net), splits, cfg, reference=ref)
    return {"macs": combination_cost(pruned).macs, "start_missed": missed_at_start(history),
            "seconds": time.perf_counter() - t0}


def study(dataset: str, seeds: list[int], workers: int | None) -> list[dict[str, Any]]:
    splits = load_dataset(dataset)
    pre = splits.preprocessing
    arch = create_arch("lenet", in_channels=pre.channels, input_size=tuple(pre.size))
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        train_cfg = TrainConfig(epochs=ZOO_EPOCHS.get(dataset, 40), seed=seed, progress=False)
        nets = run_jobs(train_single_task, [(t, arch, splits.train, train_cfg) for t in splits.tasks], workers)
        cfgs = {name: schedule_for(cfg, splits, seed) for name, cfg in SCHEDULES.items()}
        checks = check_set(splits.val, cfgs["bench"].check_shifts, seed)  # the bench's check set
        ref = reference_accuracy(nets, checks)
        jobs = [(net, splits, cfgs[name], ref) for name in SCHEDULES for net in nets]
        done = run_jobs(prune_alone, jobs, workers)
        for k, net in enumerate(nets):
            row = {"dataset": dataset, "seed": seed, "task": net.task_names[0], "unpruned": combination_cost(net).macs}
            for i, name in enumerate(SCHEDULES):
                row[name] = done[i * len(nets) + k]
            row["ratio"] = row["bench"]["macs"] / max(1, row["library"]["macs"])
            rows.append(row)
            print(f"  seed {seed} {row['task']}: bench {row['bench']['macs']:,} library {row['library']['macs']:,} "
                  f"({row['ratio']:.2f}x)", flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], seconds: float) -> str:
    ratios = [r["ratio"] for r in rows]
    within = sum(r <= 1.05 for r in ratios)
    t_bench = sum(r["bench"]["seconds"] for r in rows)
    t_lib = sum(r["library"]["seconds"] for r in rows)
    table = [[r["dataset"], r["seed"], r["task"], f"{r['unpruned']:,}", f"{r['bench']['macs']:,}",
              f"{r['library']['macs']:,}", f"{r['ratio']:.2f}"] for r in rows]
    return "\n".join([
        "# The benchmark's pruning schedule against the library's finer one (`python -m pam_app.schedule_study`)",
        "",
        "Each task's network pruned alone by the project's pruner, same zoo, budget rule and check set; "
        "*bench* = `BENCH_PRUNE` (15% steps down to 4%, 3+3 epochs, final 6), *library* = `PruneConfig()` "
        "(10% steps down to 2%, 5+5 epochs, final 10). Target: bench within 1.05x of library.",
        "",
        format_table(["data set", "seed", "task", "unpruned MACs", "bench MACs", "library MACs", "bench/library"],
                     table),
        "",
        f"bench/library: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}; "
        f"within 1.05x on {within} of {len(ratios)} networks. CPU time of the prunes: bench {t_bench / 60:.1f} min, "
        f"library {t_lib / 60:.1f} min ({t_lib / max(t_bench, 1e-9):.1f}x). Wall time {seconds / 60:.1f} min.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pam_app.schedule_study", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the bench's zoo of each)")
    p.add_argument("--workers", type=int, default=None, help="processes (default one per core)")
    p.add_argument("--out", default="results", help="directory for schedule-check.{json,md}")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = study(args.dataset, [int(s) for s in args.seeds.split(",")], args.workers)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "schedule-check.json", {"rows": rows, "seconds": seconds,
                                                    "schedules": {k: asdict(v) for k, v in SCHEDULES.items()}})
    text = markdown(rows, seconds)
    (out / "schedule-check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
