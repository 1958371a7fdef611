"""``pam demo``: the README's main job on the bundled digits."""

from __future__ import annotations

import argparse
from pathlib import Path

from merging.arch import create_arch
from merging.cost import cost_table
from merging.data import load_dataset
from merging.mergers import create_merger
from merging.report import format_table
from merging.train import TrainConfig
from merging.zoo import load_zoo, train_zoo


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    splits = load_dataset("digits")
    arch = create_arch("lenet", input_size=splits.preprocessing.size)
    print(f"== 1. single-task zoo on {splits.name}: {len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test images, tasks {', '.join(t.name for t in splits.tasks)}")
    train_zoo(splits, arch, TrainConfig(epochs=args.epochs, seed=args.seed), out / "zoo")
    nets = load_zoo(out / "zoo")
    separate = create_merger("separate").merge(nets, splits.train)
    print("\n== 2. cost of every combination without merging (separate baseline)")
    table = cost_table(separate)
    print(format_table(["combination", "MACs", "params"], [[k, c.macs, c.params] for k, c in table.items()]))
    return 0
