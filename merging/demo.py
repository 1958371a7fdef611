"""``pam demo``: the README's main job on the bundled digits.

Train the single-task zoo, merge it with PAM, prune the PAM network and the no-merging baseline
with the same pruner and budget, print the cost of every combination side by side, export the
pruned PAM network as a bundle and serve it (``--no-serve`` stops before serving).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import warnings
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
from merging.train import TrainConfig, evaluate
from merging.zoo import load_zoo, train_zoo


def _sample_png(path: Path, digit: int) -> None:
    """One 8x8 digit from the test data as a PNG, for the curl line."""
    from PIL import Image

    images, digits = raw_digits()
    idx = int(np.flatnonzero(digits == digit)[-1])
    Image.fromarray((images[idx] * 255).round().astype(np.uint8), mode="L").save(path)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from merging.bench import BENCH_PRUNE
    from merging.pipeline import merge_and_prune
    from merging.pruning import check_set, reference_accuracy

    # These networks are tiny: one intra-op thread is as fast, and far faster on a busy machine.
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    splits = load_dataset("digits")
    arch = create_arch("lenet", input_size=splits.preprocessing.size)
    print(f"== 1/5 single-task zoo on {splits.name}: {len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test images; tasks {', '.join(t.name for t in splits.tasks)}", flush=True)
    train_zoo(splits, arch, TrainConfig(epochs=args.epochs, seed=args.seed), out / "zoo")
    nets = load_zoo(out / "zoo")

    print("\n== 2/5 merge (separate baseline, pam), then prune both with the same pruner and budget "
          "(every task within 1 point of its own network)", flush=True)
    checks = check_set(splits.val, BENCH_PRUNE.check_shifts, args.seed)
    ref = reference_accuracy(nets, checks)
    pruned = {}
    for name in ("separate", "pam"):
        t0 = time.perf_counter()
        result = merge_and_prune(create_merger(name), nets, splits, replace(BENCH_PRUNE, seed=args.seed, progress=True),
                                 ref, seed=args.seed, log=print)
        groups = ", ".join(str(len(g)) for g in result.merged.layout)
        print(f"  {name:>8}: merged: groups per layer {groups}; all-task MACs {combination_cost(result.merged).macs:,}")
        history = result.history
        if result.missed_budget:
            last = [h for h in history if "check_accuracy" in h][-1]["check_accuracy"]
            worst = min(ref, key=lambda t: last[t] - ref[t])
            print(f"  {name:>8}: NOT PRUNED: the merged network misses the budget before pruning "
                  f"({worst}: {last[worst]:.1f}% vs {ref[worst]:.1f}% on the check set)")
        pruned[name] = result.pruned
        pruned[name].meta["preprocessing"] = splits.preprocessing.to_json()
        pruned[name].meta["test_accuracy"] = evaluate(pruned[name], splits.test)
        save_model(pruned[name], out / f"{name}-pruned")
        print(f"  {name:>8}: pruned to {combination_cost(pruned[name]).macs:,} all-task MACs "
              f"in {time.perf_counter() - t0:.0f}s", flush=True)

    print("\n== 3/5 cost of every combination after pruning (limit = the costliest task's own pruned network)",
          flush=True)
    sep, pam = (cost_table(pruned[n]) for n in ("separate", "pam"))
    rows = []
    for combo in sep:
        limit = max(sep[t].macs for t in combo.split("+"))
        rows.append([combo, sep[combo].macs, pam[combo].macs, f"{sep[combo].macs / max(1, pam[combo].macs):.2f}x",
                     f"{pam[combo].macs / max(1, limit):.2f}"])
    print(format_table(["combination", "separate MACs", "pam MACs", "separate/pam", "pam/limit"], rows))
    acc = {n: p.meta["test_accuracy"] for n, p in pruned.items()}
    own = {n.task_names[0]: n.meta["test_accuracy"] for n in nets}  # recorded by train_zoo
    print(format_table(["task", "own network %", "separate pruned %", "pam pruned %"],
                       [[t, own[t], acc["separate"][t], acc["pam"][t]] for t in own]))

    # Every single task, one pair and all tasks: lowering all 31 methods of five tasks takes many minutes
    # and gigabytes on 2 cores; `pam export` (no --combinations) exports every combination.
    names = sorted(t.name for t in splits.tasks)
    combos = [(t,) for t in names] + [("digit", "parity"), tuple(names)]
    print(f"\n== 4/5 export the pruned PAM network: one ExecuTorch method per combination ({len(combos)} of "
          f"{2 ** len(names) - 1} here)", flush=True)
    from mobile_export.export import ExportConfig, export_bundle

    bundle = out / "bundle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export / ExecuTorch deprecation chatter, not ours to fix
        export_bundle(out / "pam-pruned.json", bundle, ExportConfig(force=True, combinations=combos))
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
    cmd = [pam_cmd] if pam_cmd else [sys.executable, "-m", "merging.cli"]
    try:
        return subprocess.call([*cmd, "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port)])
    except KeyboardInterrupt:
        return 0

