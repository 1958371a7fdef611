"""``pam demo``: the README's main job on the generated glyphs (``--dataset digits``: the small-data case).

Train the single-task zoo, build the yardstick (each task's network pruned alone; the all-task
specialist), merge and prune with the benchmark's route, print the cost of every combination side
by side, export the shipped network as a bundle and serve it (``--no-serve`` stops before serving).
Independent jobs (the zoo's networks; the pruning runs) run side by side, one per core.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from merging.arch import create_arch
from merging.checkpoint import save_model
from merging.cost import combination_cost, cost_table
from merging.data import load_dataset
from merging.data.base import Splits
from merging.network import MultitaskNet
from merging.pruning import PruneConfig
from merging.report import format_table
from merging.tasks import combination_name
from merging.train import TrainConfig, evaluate
from merging.zoo import load_zoo, train_zoo


def _sample_png(path: Path, splits: Splits) -> None:
    """The first test image as a PNG (the inverse of the data set's preprocessing), for the curl line."""
    from PIL import Image

    pre = splits.preprocessing
    x = splits.test.x[0]
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    pixels = x.numpy() * std + mean
    if pre.invert:
        pixels = 1.0 - pixels
    arr = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
    img.save(path)


# The route the demo merges and prunes with, and why (from `pam bench`; see docs/pam.md).
DEMO_ROUTE = "pam"
DEMO_ROUTE_WHY = ("with every network on one schedule it ships in 3 of 3 composite seeds and 1 of 3 glyphs seeds, "
                  "and on glyphs its own network is 0.77-0.90x of separate for all tasks (results/bench-composite.md, "
                  "bench-glyphs.md)")
DEMO_EPOCHS = {"glyphs": 15, "digits": 60}  # zoo epochs per data set (glyphs: 8,000 training images)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from merging.pipeline import split_route
    from pam_app.bench.schedule import ROUTE_SCHEDULES, schedule_for

    # These networks are tiny: one intra-op thread is as fast, and far faster on a busy machine.
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dataset = getattr(args, "dataset", None) or "glyphs"
    args.epochs = args.epochs or DEMO_EPOCHS.get(dataset, 40)
    splits = load_dataset(dataset)
    arch = create_arch("lenet", in_channels=splits.preprocessing.channels, input_size=splits.preprocessing.size)
    route = getattr(args, "route", None) or DEMO_ROUTE
    _, removes = split_route(route)
    # One schedule for the route, the specialist and every task alone (the comparison is of structures).
    schedule = getattr(args, "schedule", None) or "baseline"
    cfg = replace(schedule_for(ROUTE_SCHEDULES[schedule], splits, args.seed), removes=removes, progress=True)
    print(f"== 1/5 single-task zoo on {splits.name}: {len(splits.train):,} train / {len(splits.val):,} val / "
          f"{len(splits.test):,} test images; tasks {', '.join(t.name for t in splits.tasks)}; "
          f"{args.epochs} epochs, {args.workers or 'one per core'} worker(s)", flush=True)
    train_zoo(splits, arch, TrainConfig(epochs=args.epochs, seed=args.seed), out / "zoo", workers=args.workers)
    nets = load_zoo(out / "zoo")
    ref = _budget(nets, splits, cfg, args.seed)
    merged, separate, spec_macs = _yardstick_and_route(route, nets, splits, cfg, ref, args, out)
    _cost_tables(nets, splits, merged, separate, spec_macs)
    names = _export(out, splits)
    print(f"\ndemo done in {time.perf_counter() - t_start:.0f}s")

    if args.no_serve:
        return 0
    print("\n== 5/5 serve it (Ctrl-C stops); in another terminal:", flush=True)
    port = args.port
    pair = ",".join(names[:2])
    print(f"  curl -s -X POST 'http://127.0.0.1:{port}/infer?tasks={pair}' -F image=@{out / 'sample.png'}")
    print(f"  open http://127.0.0.1:{port}/dashboard", flush=True)
    pam_cmd = shutil.which("pam")
    cmd = [pam_cmd] if pam_cmd else [sys.executable, "-m", "pam_app"]
    try:
        return subprocess.call([*cmd, "serve", str(out / "bundle"), "--host", "127.0.0.1", "--port", str(port)])
    except KeyboardInterrupt:
        return 0


def _budget(nets: list[MultitaskNet], splits: Splits, cfg: PruneConfig, seed: int) -> dict[str, float]:
    """The check set and each task's reference accuracy on it; prints what the set can resolve."""
    from merging.pruning import check_set, reference_accuracy
    from merging.pruning.budget import resolution_line

    checks = check_set(splits.val, cfg.check_shifts, seed, cfg.shift_below)
    ref = reference_accuracy(nets, checks)
    images = checks.images or len(checks)
    held = round(images * cfg.certify_share)
    where = (f"step decisions on {images - held:,} validation images, one certification of the result on the "
             f"other {held:,}" if held else f"decided on {images:,} validation images (results/budget-rule.md)")
    print(f"  budget: every task within {cfg.budget:g} point of its own network; {where}")
    print(f"  steps: {resolution_line(images - held, cfg.confidence, cfg.budget)}")
    if held:
        print(f"  certification: {resolution_line(held, cfg.confidence, cfg.budget)}", flush=True)
    return ref


def _yardstick_and_route(
    route: str, nets: list[MultitaskNet], splits: Splits, cfg: PruneConfig, ref: dict[str, float],
    args: argparse.Namespace, out: Path,
) -> tuple[MultitaskNet, MultitaskNet, int | None]:
    """Each task pruned alone, the all-task specialist and the route, side by side; saves what ships.
    Returns (shipped network, separately pruned networks, the all-task specialist's MACs or None)."""
    print(f"\n== 2/5 the yardstick (each task's network pruned alone; the all-task specialist: one trunk trained "
          f"for all tasks; all pruned as the route is, {cfg.step:.0%} steps, {cfg.finetune_epochs}+{cfg.retry_epochs} "
          f"epochs in batches of {cfg.batch_size}) and 3/5 route {route} "
          f"({DEMO_ROUTE_WHY if route == DEMO_ROUTE else 'chosen with --route'}), side by side", flush=True)
    t0 = time.perf_counter()
    from merging.parallel import run_jobs
    from pam_app.compress import job, route_jobs, ship

    done = run_jobs(job, route_jobs(route, nets, splits, cfg, ref, args.epochs, args.seed, with_specialist=True),
                    args.workers)
    result, spec_net, alone = done[0], done[1], done[2:]
    for net, pruned_net in zip(nets, alone, strict=True):
        before, after = combination_cost(net).macs, combination_cost(pruned_net).macs
        print(f"  {net.task_names[0]:>8} alone: {before:,} -> {after:,} MACs", flush=True)
    spec_ok = "pruned" in spec_net.meta  # prune() records it only when the start met the budget
    if spec_ok:
        print(f"  all-task specialist: {combination_cost(spec_net).macs:,} MACs")
    else:
        print("  all-task specialist: the jointly trained trunk misses the budget before pruning; no figure")
    result, separate = ship(result, alone, splits)
    merged = result.pruned
    groups = ", ".join(str(len(g)) for g in merged.layout)
    print(f"  {route}: merged all-task MACs {combination_cost(result.merged).macs:,}; shipped: "
          f"{combination_cost(merged).macs:,} ({result.chose}); groups per layer {groups} "
          f"({time.perf_counter() - t0:.0f}s)")
    if result.missed_budget:
        print("  NOT PRUNED: the merged network misses the budget before pruning")
    cert = (merged.meta.get("pruned") or {}).get("certificate")
    if cert:
        print(f"  certified on {cert['images']:,} held-out images: " + ", ".join(
            f"{t} {c['drop']:+.2f} (upper {c['upper']:.2f})" for t, c in cert["tasks"].items()))
    merged.meta["preprocessing"] = splits.preprocessing.to_json()
    merged.meta["test_accuracy"] = evaluate(merged, splits.test)
    merged.meta["route"] = route
    save_model(merged, out / "multitask-pruned")
    save_model(separate, out / "separate-pruned")
    return merged, separate, combination_cost(spec_net).macs if spec_ok else None


def _cost_tables(
    nets: list[MultitaskNet], splits: Splits, merged: MultitaskNet, separate: MultitaskNet, spec_macs: int | None,
) -> None:
    """Every combination's MACs side by side, and each task's test accuracy."""
    print("\n== cost of every combination (separate = each task's own pruned network; spec = the specialist "
          "limit: c_alone(t) for one task, the all-task specialist for all tasks)", flush=True)
    sep, got = cost_table(separate), cost_table(merged)
    full = combination_name([n.task_names[0] for n in nets])
    rows = []
    for combo in sep:
        spec = (sep[combo].macs if "+" not in combo
                else spec_macs if combo == full else None)
        rows.append([combo, sep[combo].macs, got[combo].macs, f"{sep[combo].macs / max(1, got[combo].macs):.2f}x",
                     f"{spec:,}" if spec else "-", f"{got[combo].macs / spec:.2f}" if spec else "-"])
    print(format_table(["combination", "separate MACs", "shipped MACs", "separate/shipped", "spec MACs",
                        "shipped/spec"], rows))
    sep_acc = evaluate(separate, splits.test)
    own = {n.task_names[0]: n.meta["test_accuracy"] for n in nets}  # recorded by train_zoo
    print(format_table(["task", "own network %", "separate pruned %", "shipped pruned %", "shipped - own"],
                       [[t, own[t], sep_acc[t], merged.meta["test_accuracy"][t],
                         f"{merged.meta['test_accuracy'][t] - own[t]:+.2f}"] for t in own]))


def _export(out: Path, splits: Splits) -> list[str]:
    """The shipped network as an ExecuTorch bundle, and a sample image; returns the task names."""
    names = sorted(t.name for t in splits.tasks)
    print(f"\n== 4/5 export the pruned multitask network: one ExecuTorch method per combination "
          f"({2 ** len(names) - 1} methods; library chatter goes to the bundle's export.log)", flush=True)
    from mobile_export.export import ExportConfig, export_bundle

    bundle = out / "bundle"
    export_bundle(out / "multitask-pruned.json", bundle, ExportConfig(force=True))
    _sample_png(out / "sample.png", splits)
    print(f"  bundle: {bundle}/ (model.pte, manifest.json, report.json); sample image {out / 'sample.png'}")
    return names
