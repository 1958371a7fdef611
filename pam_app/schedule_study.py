"""Is the benchmark's coarser pruning schedule as strong as the library's finer one?

``python -m pam_app.schedule_study`` (issue 20: "every route within 5% of the MACs the slower schedule
reaches"). For each seed: train the benchmark's zoo (the same networks ``pam bench`` trains for that
seed), then prune every task's network alone with the project's pruner twice, under the same budget
rule and check set: the benchmark's schedule (``FAST_PRUNE``: 15% steps down to 4%, 3 epochs after a
step and 9 more before a rejected one is undone, 6 final) and the library's (``PruneConfig()``: 10%
steps down to 2%, 5+5 epochs, 10 final), and any other variant named. Reports each
network's MACs, the ratio fast/slow and the time each took. The merged routes are not compared here
(their ladders make one slow-schedule seed take tens of minutes); the single networks are what every
route's ``c_alone`` yardstick and ``separate`` rest on.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import asdict, replace
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
from pam_app.bench.schedule import FAST_PRUNE, ZOO_EPOCHS, schedule_for
from pam_common.atomic import atomic_write_text

LIBRARY = PruneConfig(progress=False)
SHORT_RETRY = replace(FAST_PRUNE, retry_epochs=3)  # the benchmark's schedule before the long retry (3+3)
# Every variant: (schedule, offset added to the seed of the pruning run). "library-reseed" is the library
# schedule run again with other fine-tuning seeds and check-set shifts: what one run's MACs vary by
# anyway (the noise floor any "within 5%" is measured against).
VARIANTS: dict[str, tuple[PruneConfig, int]] = {
    "bench": (FAST_PRUNE, 0),  # 15% steps, 3 epochs after a step, 9 more before a rejected one is undone
    "library": (LIBRARY, 0),
    "library-reseed": (LIBRARY, 100),
    "bench-3+3": (SHORT_RETRY, 0),
    "bench-3+3-rebound": (replace(SHORT_RETRY, schedule="rebound"), 0),
    # Which half of the benchmark's saving costs the strength: its coarser steps or its shorter fine-tunes.
    "bench-steps+5+5": (replace(FAST_PRUNE, finetune_epochs=5, retry_epochs=5, final_epochs=10), 0),
    "library-steps+3+3": (replace(LIBRARY, finetune_epochs=3, retry_epochs=3, final_epochs=6), 0),
    # Gradual pruning: many small steps, each with a short fine-tune (the same total training spread over
    # more, gentler cuts), so the network is cut where it has recovered and the end is found in 1% steps.
    "gradual-5x1": (replace(FAST_PRUNE, step=0.05, min_step=0.01, max_steps=80, finetune_epochs=1,
                            retry_epochs=1), 0),
    "gradual-5x1-rebound": (replace(FAST_PRUNE, step=0.05, min_step=0.01, max_steps=80, finetune_epochs=1,
                                    retry_epochs=1, schedule="rebound"), 0),
    "gradual-5x2": (replace(FAST_PRUNE, step=0.05, min_step=0.01, max_steps=80, finetune_epochs=2,
                            retry_epochs=2), 0),
    "library-steps+3+3-rebound": (replace(LIBRARY, finetune_epochs=3, retry_epochs=3, final_epochs=6,
                                                   schedule="rebound"), 0),
    # Long retries (a rejected step fine-tuned longer before it is undone; "bench" is 3+9) and coarser steps.
    "library-steps+2+6": (replace(LIBRARY, finetune_epochs=2, retry_epochs=6, final_epochs=6), 0),
    "gradual-5+1+5": (replace(FAST_PRUNE, step=0.05, min_step=0.01, max_steps=80, finetune_epochs=1,
                              retry_epochs=5), 0),
    "bench-steps+2+9": (replace(FAST_PRUNE, finetune_epochs=2, retry_epochs=9), 0),
    "bench-steps+3+6": (replace(FAST_PRUNE, finetune_epochs=3, retry_epochs=6), 0),
    "coarse-20+3+9": (replace(FAST_PRUNE, step=0.2, finetune_epochs=3, retry_epochs=9), 0),
    # Does a long retry strengthen the library's schedule too (c_alone's project route, the baseline)?
    "library+long-retry": (replace(LIBRARY, retry_epochs=15), 0),
    "library+long-retry-reseed": (replace(LIBRARY, retry_epochs=15), 100),
    # The baseline's retry in parts, each judged: a step that passes after the first part skips the rest.
    "long-retry-3x5": (replace(LIBRARY, retry_epochs=15, retry_checks=3), 0),
    "long-retry-5x3": (replace(LIBRARY, retry_epochs=15, retry_checks=5), 0),
    # Fewer, larger steps with the baseline's fine-tuning (20% steps down to 4%: three rejections end a run, as
    # 10% down to 2% does); the same with the retry in judged parts.
    "coarse-20+5+15": (replace(LIBRARY, step=0.2, min_step=0.04, retry_epochs=15), 0),
    "coarse-20+5+15-3x5": (replace(LIBRARY, step=0.2, min_step=0.04, retry_epochs=15, retry_checks=3), 0),
    # The baseline's epochs in batches of 128: half the optimizer steps, each about as dear as one of 64 on a
    # pruned LeNet (a step of these networks is mostly per-call overhead), with the learning rate scaled.
    "long-retry-b128": (replace(LIBRARY, retry_epochs=15, batch_size=128, lr=2e-3, final_lr=1e-3), 0),
    "long-retry-b128-sqrt": (replace(LIBRARY, retry_epochs=15, batch_size=128, lr=1.4e-3, final_lr=7e-4), 0),
    "long-retry-b256": (replace(LIBRARY, retry_epochs=15, batch_size=256, lr=4e-3, final_lr=2e-3), 0),
    "long-retry-b256-sqrt": (replace(LIBRARY, retry_epochs=15, batch_size=256, lr=2e-3, final_lr=1e-3), 0),
    "long-retry-b128-3x5": (replace(LIBRARY, retry_epochs=15, retry_checks=3, batch_size=128, lr=2e-3, final_lr=1e-3),
                            0),
}


def _described(name: str) -> dict[str, Any]:
    """A variant's configuration as the JSON records it (what ``--reuse`` compares)."""
    return json.loads(json.dumps({"seed_offset": VARIANTS[name][1], **asdict(VARIANTS[name][0])}))


def prune_alone(net: MultitaskNet, splits: Splits, cfg: PruneConfig, ref: dict[str, float] | None) -> dict[str, Any]:
    """One single-task network pruned alone (a worker job): its MACs, the seconds it took and how its
    steps went (``ref`` None: its own accuracy on its own check set)."""
    t0, c0 = time.perf_counter(), time.process_time()
    pruned, history = prune(copy.deepcopy(net), splits, cfg, reference=ref)
    steps = [h for h in history if h.get("kind") in ("step", "retry")]
    reference = history[0]["reference"]
    return {"macs": combination_cost(pruned).macs, "start_missed": missed_at_start(history),
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "accepted": sum(1 for h in history if h.get("accepted")),
            "rejected": sum(1 for h in history if h.get("accepted") is False),
            "retries": sum(1 for h in steps if h["kind"] == "retry"),
            "stop": next((h["reason"] for h in history if h.get("kind") == "stop"), ""),
            # every judged step and retry part: its worst point drop (check set) and verdict
            "looks": [[h["kind"], h.get("part", 0), round(max(reference[t] - a for t, a in h["check_accuracy"].items()), 3),
                       bool(h["within_budget"])] for h in steps]}


def study(dataset: str, seeds: list[int], workers: int | None, variants: list[str],
          reuse: dict[tuple[int, str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    splits = load_dataset(dataset)
    pre = splits.preprocessing
    arch = create_arch("lenet", in_channels=pre.channels, input_size=tuple(pre.size))
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        train_cfg = TrainConfig(epochs=ZOO_EPOCHS.get(dataset, 40), seed=seed, progress=False)
        nets = run_jobs(train_single_task, [(t, arch, splits.train, train_cfg) for t in splits.tasks], workers)
        cfgs = {name: replace(schedule_for(VARIANTS[name][0], splits, seed), seed=seed + VARIANTS[name][1])
                for name in variants}
        checks = check_set(splits.val, FAST_PRUNE.check_shifts, seed)  # the bench's check set
        ref = reference_accuracy(nets, checks)
        jobs = [(name, net) for name in variants for net in nets
                if (seed, net.task_names[0], name) not in reuse]
        done = dict(zip(jobs, run_jobs(
            prune_alone, [(net, splits, cfgs[name], ref if VARIANTS[name][1] == 0 else None) for name, net in jobs],
            workers), strict=True))
        for net in nets:
            task = net.task_names[0]
            row = {"dataset": dataset, "seed": seed, "task": task, "unpruned": combination_cost(net).macs}
            for name in variants:
                row[name] = reuse.get((seed, task, name)) or done[(name, net)]
            rows.append(row)
            print(f"  seed {seed} {task}: " + ", ".join(f"{n} {row[n]['macs']:,}" for n in variants), flush=True)
    return rows


def sign_test(k: int, n: int) -> float:
    """Two-sided exact sign test: how likely k or more (or as few) of n paired differences point one
    way when either way is equally likely."""
    tail = sum(math.comb(n, i) for i in range(max(k, n - k), n + 1)) / 2**n
    return min(1.0, 2 * tail)


def _summary(rows: list[dict[str, Any]], name: str, against: str = "library") -> list[Any]:
    ratios = [r[name]["macs"] / max(1, r[against]["macs"]) for r in rows]
    # CPU seconds of the job's process (one thread): unlike wall seconds, not inflated by a busy machine.
    timed = all("cpu_seconds" in r[name] for r in rows)
    cpu = f"{sum(r[name]['cpu_seconds'] for r in rows) / 60:.1f}" if timed else (
        f"- (wall {sum(r[name]['seconds'] for r in rows) / 60:.1f} on a busy machine)")
    steps = [r[name].get("accepted") for r in rows]
    known = [x for x in steps if x is not None]
    rejected = [r[name].get("rejected", 0) for r in rows]
    dearer = sum(x > 1.0 for x in ratios)
    differ = sum(x != 1.0 for x in ratios)
    out = [name, f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}",
           f"{sum(x <= 1.05 for x in ratios)} of {len(ratios)}",
           f"{dearer} of {differ} (p {sign_test(dearer, differ):.3f})" if differ else "-", cpu,
           f"{statistics.median(known):g} / {statistics.median(rejected):g}" if known else "-"]
    if f"{against}-reseed" in rows[0]:
        out.append(f"{pooled_ratio(rows, name, against):.2f}")
    return out


def pooled_ratio(rows: list[dict[str, Any]], name: str, against: str) -> float:
    """Geometric mean over networks of MACs / the geometric mean of ``against`` and its re-seeded run: two
    draws of the same schedule, so its own two runs sit either side of 1.00 by as much as one run varies."""
    logs = [math.log(r[name]["macs"]) - (math.log(r[against]["macs"]) + math.log(r[f"{against}-reseed"]["macs"])) / 2
            for r in rows]
    return math.exp(sum(logs) / len(logs))


def markdown(rows: list[dict[str, Any]], variants: list[str], seconds: float, against: str = "library") -> str:
    table = [[r["dataset"], r["seed"], r["task"], f"{r['unpruned']:,}",
              *(f"{r[n]['macs']:,}" for n in variants)] for r in rows]
    described = {n: VARIANTS[n][0] for n in variants}
    lines = [f"- *{n}*: {c.step:.0%} steps down to {c.min_step:.0%} ({c.schedule}), at most {c.max_steps} steps, "
             f"{c.finetune_epochs}+{c.retry_epochs} epochs"
             + (f" (the retry in {c.retry_checks} judged parts)" if c.retry_checks > 1 else "")
             + f" in batches of {c.batch_size} (lr {c.lr:g}), final {c.final_epochs}"
             + (f"; pruning seeds +{VARIANTS[n][1]}" if VARIANTS[n][1] else "") for n, c in described.items()]
    return "\n".join([
        "# Pruning schedules compared on networks pruned alone (`python -m pam_app.schedule_study`)",
        "",
        "Each task's network pruned alone by the project's pruner: the benchmark's zoo, the same budget rule and "
        f"check set; every ratio against *{against}*. Target (issue 20): a faster schedule within 1.05x of the "
        "slower one's MACs. A *-reseed* variant runs a schedule again with other fine-tuning seeds and check-set "
        "shifts: its spread is what one run varies by anyway, so a ratio inside it is not a difference the study "
        "resolves.",
        "",
        *lines,
        "",
        format_table(["data set", "seed", "task", "unpruned MACs", *(f"{n} MACs" for n in variants)], table),
        "",
        format_table(["schedule", f"MACs / {against} (median)", "range", "within 1.05x", f"dearer than {against}",
                      "CPU min", "steps accepted / rejected (median)",
                      *(["MACs / both runs of it (geomean)"] if f"{against}-reseed" in rows[0] else [])],
                     [_summary(rows, n, against) for n in variants]),
        "",
        f"*dearer than {against}*: networks where the schedule ends with more MACs, of those where the two differ, "
        f"and the exact sign test's two-sided p (a schedule as strong as {against} is dearer about half the "
        "time). *MACs / both runs of it*: against the geometric mean of the two runs of the same schedule (its "
        "own seeds and re-seeded), so neither draw's luck sets the yardstick. *CPU min*: the prune jobs' process CPU time (one thread each), so a busy machine does not "
        "inflate it (\"-\": some of its runs predate that record; their wall time is given).",
        "",
        f"Wall time {seconds / 60:.1f} min (some rows may come from an earlier run of the same seeds: ``--reuse``).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pam_app.schedule_study", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the bench's zoo of each)")
    p.add_argument("--schedules", default="bench,library,library-reseed",
                   help=f"comma-separated variants, library among them (known: {', '.join(VARIANTS)})")
    p.add_argument("--reuse", default=None, help="an earlier schedule-check.json: its rows of the same seed, task and "
                   "variant are taken instead of pruning again (runs are deterministic per seed)")
    p.add_argument("--against", default="library", help="the variant every ratio is taken against (one of --schedules)")
    p.add_argument("--workers", type=int, default=None, help="processes (default one per core)")
    p.add_argument("--out", default="results", help="directory for schedule-check[-<dataset>].{json,md} "
                   "(no suffix for digits)")
    p.add_argument("--render", default=None, help="only rewrite the markdown of an earlier schedule-check JSON "
                   "(beside it), with --against")
    args = p.parse_args(argv)
    if args.render:
        done = json.loads(Path(args.render).read_text())
        atomic_write_text(Path(args.render).with_suffix(".md"),
                          markdown(done["rows"], list(done["variants"]), done["seconds"], args.against))
        return 0
    variants = [v for v in args.schedules.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.against not in variants:
        p.error(f"--schedules needs {args.against} (--against) and known variants; unknown: {unknown} "
                f"(known: {', '.join(VARIANTS)})")
    reuse: dict[tuple[int, str, str], dict[str, Any]] = {}
    if args.reuse:
        earlier = json.loads(Path(args.reuse).read_text())
        # Only rows of this data set, and of variants whose configuration is still the one of that name.
        same = [n for n in variants if earlier.get("variants", {}).get(n) == _described(n)]
        for r in earlier["rows"]:
            if r.get("dataset") == args.dataset:
                reuse.update({(r["seed"], r["task"], n): {**r[n], "reused": True} for n in same if n in r})
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = study(args.dataset, [int(s) for s in args.seeds.split(",")], args.workers, variants, reuse)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "schedule-check" if args.dataset == "digits" else f"schedule-check-{args.dataset}"
    atomic_write_json(out / f"{stem}.json", {"rows": rows, "seconds": seconds, "variants": {
        n: _described(n) for n in variants}})
    text = markdown(rows, variants, seconds, args.against)
    atomic_write_text(out / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
