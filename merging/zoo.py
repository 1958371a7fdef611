"""The single-task zoo: one network per task, same architecture, same input."""

from __future__ import annotations

import json
from pathlib import Path

from merging.arch import ArchConfig
from merging.checkpoint import atomic_write_json, load_model, save_model
from merging.cost import combination_cost
from merging.data.base import Splits
from merging.distributed import barrier, is_main, world_size
from merging.errors import MergingError
from merging.network import MultitaskNet
from merging.parallel import run_jobs
from merging.report import format_table
from merging.train import TrainConfig, evaluate, train_single_task

ZOO_INDEX = "zoo.json"


def train_zoo(
    splits: Splits, arch: ArchConfig, cfg: TrainConfig, out: Path, verbose: bool = True, workers: int = 1
) -> dict[str, Path]:
    """Train and save one network per task; ``workers`` > 1 trains that many side by side in
    worker processes (not under torchrun, where the ranks share each network instead)."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    rows = []
    per_task: dict[str, dict[str, object]] = {}
    index = {"dataset": splits.name, "arch": arch.to_json(), "seed": cfg.seed, "tasks": per_task}
    jobs = [(task, arch, splits.train, cfg) for task in splits.tasks]
    nets = run_jobs(train_single_task, jobs, workers if world_size() <= 1 else 1)
    for task, net in zip(splits.tasks, nets, strict=True):
        val = evaluate(net, splits.val)[task.name]
        test = evaluate(net, splits.test)[task.name]
        net.meta.update({"dataset": splits.name, "val_accuracy": val, "test_accuracy": test,
                         "preprocessing": splits.preprocessing.to_json()})
        # Every rank trained the same network (DDP); rank 0 alone writes it.
        paths[task.name] = save_model(net, out / task.name) if is_main() else (out / task.name).with_suffix(".json")
        cost = combination_cost(net)
        per_task[task.name] = {"model": paths[task.name].name, "val_accuracy": val, "test_accuracy": test,
                                     "macs": cost.macs, "params": cost.params}
        rows.append([task.name, task.kind, val, test, cost.macs, cost.params])
    if is_main():
        atomic_write_json(out / ZOO_INDEX, index)
    barrier()  # the other ranks return paths that exist once rank 0 wrote them
    if verbose and is_main():
        print(format_table(["task", "kind", "val acc %", "test acc %", "MACs", "params"], rows))
        print(f"saved {len(paths)} networks under {out}/")
    return paths


def load_zoo(zoo_dir: Path, tasks: tuple[str, ...] | None = None) -> list[MultitaskNet]:
    """The zoo's networks in the index's task order (or ``tasks``' order)."""
    index_path = zoo_dir / ZOO_INDEX
    if not index_path.is_file():
        raise MergingError("missing_zoo", f"no {ZOO_INDEX} in {zoo_dir}: train one with `pam train --out {zoo_dir}`")
    index = json.loads(index_path.read_text())
    names = tasks or tuple(index["tasks"])
    missing = [t for t in names if t not in index["tasks"]]
    if missing:
        raise MergingError("unknown_task", f"zoo {zoo_dir} has no network for {missing}; it has {list(index['tasks'])}")
    return [load_model(zoo_dir / index["tasks"][t]["model"]) for t in names]
