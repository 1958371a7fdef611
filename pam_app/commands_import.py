"""``pam import-torchvision``: a torchvision-trained single-task network as a zoo entry (parser side kept light)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from merging.errors import MergingError

USER_ERRORS: tuple[type[BaseException], ...] = (MergingError,)


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise MergingError("bad_argument", f"--input-size expects N or HxW, got {text!r}")
    return parts[0], parts[1]


def cmd_import_torchvision(args: argparse.Namespace) -> int:
    from merging.checkpoint import atomic_write_json, save_model
    from merging.cost import combination_cost
    from merging.importers import import_torchvision
    from merging.tasks import TaskSpec
    from merging.zoo import ZOO_INDEX

    labels = tuple(v.strip() for v in args.labels.split(",") if v.strip())
    task = TaskSpec(args.task, args.kind, labels)
    out = Path(args.out)
    stem = out.with_suffix("") if out.suffix in (".json", ".pt") else out
    weights = Path(args.weights)
    if weights.resolve() == stem.with_suffix(".pt").resolve():
        raise MergingError("bad_argument", f"--out {out} would overwrite the file it imports, {weights}: pick another")
    net = import_torchvision(weights, task, args.arch, _size(args.input_size),
                             preprocessing=None if args.preprocessing == "none" else "imagenet")
    index_path = stem.parent / ZOO_INDEX
    index: dict[str, Any] = {"dataset": None, "arch": net.arch.to_json(), "seed": None, "tasks": {}}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MergingError("corrupt_zoo", f"{index_path} is not valid JSON: {e}") from e
        if not isinstance(index, dict) or not isinstance(index.get("tasks"), dict):
            raise MergingError("corrupt_zoo", f"{index_path} is not a zoo index")
    path = save_model(net, stem)
    cost = combination_cost(net)
    index["tasks"][task.name] = {"model": path.name, "macs": cost.macs, "params": cost.params,
                                 "source": net.meta["source"]}
    atomic_write_json(index_path, index)
    src = net.meta["source"]
    wm = f" (width_mult {src['width_mult']})" if "width_mult" in src else ""
    h, w = net.arch.input_size
    print(f"imported torchvision {src['arch']}{wm} for task {task.name!r} ({task.out_dim} {task.kind}) at "
          f"{h}x{w}: {cost.macs:,} MACs, {cost.params:,} parameters -> {path} (zoo index {index_path})")
    return 0


def add_import_parser(sub: Any) -> None:
    p = sub.add_parser(
        "import-torchvision",
        help="import a torchvision resnet18/resnet34/mobilenet_v2 with its classifier replaced as a zoo entry",
        description="Import a single-task network trained with torchvision (its state dict, saved with "
        "torch.save(model.state_dict(), path); loaded weights-only) into the resnet or mobilenetv2 family, "
        "with the same outputs, as a zoo entry `pam merge --zoo DIR` accepts.",
    )
    p.add_argument("weights", help="the .pt state dict")
    p.add_argument("--task", required=True, help="task name (as in the data set `pam merge --dataset` uses)")
    p.add_argument("--kind", choices=("classes", "attributes"), default="classes",
                   help="classes: one softmax over the labels; attributes: one sigmoid per label")
    p.add_argument("--labels", required=True, help="comma-separated labels, as many as the classifier's outputs")
    p.add_argument("--arch", choices=("resnet18", "resnet34", "mobilenet_v2"), default=None,
                   help="default: detected from the keys")
    p.add_argument("--input-size", default="224", help="N or HxW the network runs at (default 224)")
    p.add_argument("--preprocessing", choices=("imagenet", "none"), default="imagenet",
                   help="record torchvision's ImageNet normalisation in the model (the bundle's manifest repeats it)")
    p.add_argument("--out", required=True, help="ZOO_DIR/NAME.json; ZOO_DIR/zoo.json gains (or updates) the entry")
    p.set_defaults(func=cmd_import_torchvision)


def register(sub: Any) -> None:
    """What ``pam_app.cli`` calls for each module in ``COMMAND_MODULES``."""
    add_import_parser(sub)
