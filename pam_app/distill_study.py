"""``pam distill-study``: does retraining a merged network on its references' outputs help the budget?

For each data set: train the zoo, merge it with PAM (default settings), and retrain the merged
network the way the pruner recovers it (``recover_epochs`` at ``recover_lr``), once on the labels
alone and once with each task's own network as a teacher (``distill``). Both are judged on the same
check set against the references: point drop, disagreement with the reference, and the upper
bound of the paired test (what certification needs), per task.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from merging.arch import create_arch
from merging.checkpoint import atomic_write_json
from merging.data import load_dataset
from merging.mergers import create_merger
from merging.pruning import assess, check_set, reference_accuracy
from merging.pruning.pruner import _finetune, teachers_of
from merging.report import format_table
from merging.train import TrainConfig, train_single_task
from pam_app.bench.schedule import FAST_PRUNE, ZOO_EPOCHS, schedule_for


def study_dataset(name: str, seed: int, distill: float) -> dict[str, Any]:
    splits = load_dataset(name)
    pre = splits.preprocessing
    arch = create_arch("lenet", in_channels=pre.channels, input_size=pre.size)
    epochs = ZOO_EPOCHS.get(name, 40)
    nets = [train_single_task(t, arch, splits.train, TrainConfig(epochs=epochs, seed=seed, progress=False))
            for t in splits.tasks]
    cfg = schedule_for(FAST_PRUNE, splits, seed)
    checks = check_set(splits.val, cfg.check_shifts, seed, cfg.shift_below)
    ref = reference_accuracy(nets, checks)
    merged = create_merger("pam").merge(nets, splits.train, seed=seed)
    out: dict[str, Any] = {"dataset": name, "seed": seed, "check_images": checks.images or len(checks)}
    for label, weight in (("labels", 0.0), ("labels+teachers", distill)):
        net = copy.deepcopy(merged)
        run = replace(cfg, distill=weight)
        _finetune(net, splits.train, run, run.recover_epochs, seed + 100, run.recover_lr,
                  teachers=teachers_of(net, ref, run))
        v = assess(net, checks, ref, cfg.budget, cfg.confidence)
        out[label] = {"drop": v.drop, "upper": v.upper, "disagreement": v.disagreement, "within_budget": v.ok}
    return out


def main_distill(args: Any) -> int:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = [study_dataset(d, args.seed, args.distill) for d in args.datasets.split(",")]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "distill.json", {"results": results, "distill": args.distill,
                                             "seconds": time.perf_counter() - t0})
    lines = ["# Retraining a merged network with and without its references as teachers (`pam distill-study`)", "",
             f"PAM's default merge, retrained as the pruner recovers it; distillation weight {args.distill}; "
             f"seed {args.seed}. Disagreement: share of check images where the merged network and the task's own "
             "network differ in correctness; upper: the paired test's one-sided 90% bound of the drop (points).", ""]
    for r in results:
        rows = []
        for t in r["labels"]["drop"]:
            a, b = r["labels"], r["labels+teachers"]
            rows.append([t, f"{a['drop'][t]:.2f}", f"{b['drop'][t]:.2f}", f"{100 * a['disagreement'][t]:.1f}",
                         f"{100 * b['disagreement'][t]:.1f}", f"{a['upper'][t]:.2f}", f"{b['upper'][t]:.2f}"])
        lines += [f"## {r['dataset']} ({r['check_images']:,} check images)", "",
                  format_table(["task", "drop labels", "drop +teachers", "disagree % labels",
                                "disagree % +teachers", "upper labels", "upper +teachers"], rows), ""]
    (out / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
