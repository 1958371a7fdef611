"""``pam demo``: the README's main job on the bundled digits.

Train the single-task zoo, merge it with PAM, prune the PAM network and the no-merging baseline
with the same pruner and budget, print the cost of every combination side by side, export the
pruned PAM network as a bundle and serve it (``--no-serve`` stops before serving).
"""

from __future__ import annotations

import argparse
import copy
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
from merging.data.digits import raw_digits
from merging.mergers import create_merger
from merging.report import format_table
from merging.tasks import combination_name
from merging.train import TrainConfig, evaluate
from merging.zoo import load_zoo, train_zoo


def _sample_png(path: Path, digit: int) -> None:
    """One 8x8 digit from the test data as a PNG, for the curl line."""
    from PIL import Image

    images, digits = raw_digits()
    idx = int(np.flatnonzero(digits == digit)[-1])
    Image.fromarray((images[idx] * 255).round().astype(np.uint8), mode="L").save(path)


# The route the demo merges and prunes with, and why (from `pam bench`; see docs/pam.md).
DEMO_ROUTE = "pam+regroup"
DEMO_ROUTE_WHY = ("closest to the specialist limit on its worst combination on digits in `pam bench` "
                  "(results/bench-digits.md, seed 0: worst c_route(C)/c_spec(C) 2.47, against 3.68 shared+regroup, "
                  "3.83 shared, 4.27 pam)")

def run_demo(args: argparse.Namespace) -> int:
    import torch

    from merging.bench import BENCH_PRUNE, split_route
    from merging.pipeline import merge_and_prune
    from merging.pruning import check_set, prune, reference_accuracy
    from merging.references import specialist

    # These networks are tiny: one intra-op thread is as fast, and far faster on a busy machine.
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    splits = load_dataset("digits")
    arch = create_arch("lenet", input_size=splits.preprocessing.size)
    route = getattr(args, "route", None) or DEMO_ROUTE
    base, regroup = split_route(route)
    # The benchmark's schedule (coarser than the library default) keeps the demo within minutes.
    cfg = replace(BENCH_PRUNE, seed=args.seed, regroup=regroup, progress=True)
    print(f"== 1/5 single-task zoo on {splits.name}: {len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test images; tasks {', '.join(t.name for t in splits.tasks)}", flush=True)
    train_zoo(splits, arch, TrainConfig(epochs=args.epochs, seed=args.seed), out / "zoo")
    nets = load_zoo(out / "zoo")
    names = [n.task_names[0] for n in nets]
    checks = check_set(splits.val, cfg.check_shifts, args.seed)
    ref = reference_accuracy(nets, checks)

    print("\n== 2/5 the yardstick: each task's network pruned alone (no merging) and the all-task specialist "
          "(one trunk trained for all tasks, pruned the same way); budget: every task within 1 point of its own "
          f"network, one-sided {cfg.confidence:.0%} test on the check set", flush=True)
    t0 = time.perf_counter()
    alone = []
    for net in nets:
        pruned_net, _ = prune(copy.deepcopy(net), splits, replace(cfg, regroup=False, progress=False), reference=ref)
        alone.append(pruned_net)
        before, after = combination_cost(net).macs, combination_cost(pruned_net).macs
        print(f"  {net.task_names[0]:>8} alone: {before:,} -> {after:,} MACs", flush=True)
    separate = create_merger("separate").merge(alone, splits.train)
    spec_net, _ = specialist(nets, splits.train, splits, replace(cfg, regroup=False, progress=False), ref,
                             TrainConfig(epochs=args.epochs, progress=False), seed=args.seed)
    print(f"  all-task specialist: {combination_cost(spec_net).macs:,} MACs ({time.perf_counter() - t0:.0f}s)",
          flush=True)

    print(f"\n== 3/5 merge with {base!r} and prune{' with regrouping' if regroup else ''} (route {route}: "
          f"{DEMO_ROUTE_WHY if route == DEMO_ROUTE else 'chosen with --route'})", flush=True)
    t0 = time.perf_counter()
    options = {"train": TrainConfig(epochs=args.epochs, progress=False)} if base == "shared" else {}
    result = merge_and_prune(create_merger(base, **options), nets, splits, cfg, ref, seed=args.seed, log=print)
    merged = result.pruned
    groups = ", ".join(str(len(g)) for g in merged.layout)
    print(f"  merged: all-task MACs {combination_cost(result.merged).macs:,}; pruned: "
          f"{combination_cost(merged).macs:,}; groups per layer {groups} ({time.perf_counter() - t0:.0f}s)")
    if result.missed_budget:
        print("  NOT PRUNED: the merged network misses the budget before pruning")
    merged.meta["preprocessing"] = splits.preprocessing.to_json()
    merged.meta["test_accuracy"] = evaluate(merged, splits.test)
    merged.meta["route"] = route
    save_model(merged, out / "multitask-pruned")
    save_model(separate, out / "separate-pruned")

    print("\n== cost of every combination (separate = each task's own pruned network; spec = the specialist "
          "limit: c_alone(t) for one task, the all-task specialist for all five)", flush=True)
    sep, got = cost_table(separate), cost_table(merged)
    full = combination_name(names)
    rows = []
    for combo in sep:
        spec = sep[combo].macs if "+" not in combo else combination_cost(spec_net).macs if combo == full else None
        rows.append([combo, sep[combo].macs, got[combo].macs, f"{sep[combo].macs / max(1, got[combo].macs):.2f}x",
                     f"{spec:,}" if spec else "-", f"{got[combo].macs / spec:.2f}" if spec else "-"])
    print(format_table(["combination", "separate MACs", f"{route} MACs", f"separate/{route}", "spec MACs",
                        f"{route}/spec"], rows))
    sep_acc = evaluate(separate, splits.test)
    own = {n.task_names[0]: n.meta["test_accuracy"] for n in nets}  # recorded by train_zoo
    print(format_table(["task", "own network %", "separate pruned %", f"{route} pruned %"],
                       [[t, own[t], sep_acc[t], merged.meta["test_accuracy"][t]] for t in own]))

    names = sorted(t.name for t in splits.tasks)
    print(f"\n== 4/5 export the pruned multitask network: one ExecuTorch method per combination "
          f"({2 ** len(names) - 1} methods; library chatter goes to the bundle's export.log)", flush=True)
    from mobile_export.export import ExportConfig, export_bundle

    bundle = out / "bundle"
    export_bundle(out / "multitask-pruned.json", bundle, ExportConfig(force=True))
    _sample_png(out / "digit.png", 7)
    print(f"  bundle: {bundle}/ (model.pte, manifest.json, report.json); sample image {out / 'digit.png'}")
    print(f"\ndemo done in {time.perf_counter() - t_start:.0f}s")

    if args.no_serve:
        return 0
    print("\n== 5/5 serve it (Ctrl-C stops); in another terminal:", flush=True)
    port = args.port
    print(f"  curl -s -X POST 'http://127.0.0.1:{port}/infer?tasks=digit,parity' -F image=@{out / 'digit.png'}")
    print(f"  open http://127.0.0.1:{port}/dashboard", flush=True)
    pam_cmd = shutil.which("pam")
    cmd = [pam_cmd] if pam_cmd else [sys.executable, "-m", "pam_app"]
    try:
        return subprocess.call([*cmd, "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)])
    except KeyboardInterrupt:
        return 0

