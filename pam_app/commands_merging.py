"""``pam train``, ``pam info``: the foundation's subcommands (parser side kept light)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from merging.arch import list_archs
from merging.errors import MergingError

USER_ERRORS: tuple[type[BaseException], ...] = (MergingError,)


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits",
                   help="digits | digits-partitions | composite | glyphs | scenes | scenes-64 | folder | celeba")
    add_data_options(g)


def add_data_options(g: Any, tasks: bool = True) -> None:
    """The options that name and shape a data set, beside ``--dataset`` (which ``pam bench`` sets its own way)."""
    if tasks:
        g.add_argument("--tasks", default=None, help="comma-separated subset of the data set's tasks")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    g.add_argument("--data-root", default=None, help="folder: image folder; celeba: image folder")
    g.add_argument("--labels-csv", default=None, help="folder: labels CSV (default DATA_ROOT/labels.csv)")
    g.add_argument("--attr-file", default=None, help="celeba: list_attr_celeba.txt")
    g.add_argument(
        "--task-groups", default=None, help="celeba: 'name=Attr,Attr;name2=Attr' (tasks as attribute groups)"
    )
    g.add_argument("--image-size", default=None, help="folder/celeba: HxW to resize to, e.g. 32x32; "
                   "scenes: 16-128; glyphs: 12-64 (square)")
    g.add_argument("--channels", type=int, default=None, help="folder/celeba: 1 (grayscale) or 3 (RGB)")
    g.add_argument("--eager", action="store_true",
                   help="folder/celeba: decode every image into memory first (default: when they fit in 2 GB)")
    g.add_argument("--stream", action="store_true",
                   help="folder/celeba: always stream images from disk (default: only when they do not fit in 2 GB)")
    g.add_argument("--loader-workers", type=int, default=None, help="folder/celeba: DataLoader workers (default 2)")
    g.add_argument("--cache-mb", type=float, default=None,
                   help="folder/celeba: decoded-image cache in MB, split between the process and its workers "
                   "(default 32)")


def dataset_from_args(args: argparse.Namespace) -> Any:
    from merging.data import load_dataset

    kw, tasks = dataset_kwargs(args)
    splits = load_dataset(args.dataset, **kw)
    if tasks and args.dataset not in ("digits", "folder"):
        for part in ("train", "val", "test"):
            setattr(splits, part, getattr(splits, part).select_tasks(tasks))
    return splits


def dataset_kwargs(args: argparse.Namespace) -> tuple[dict[str, Any], tuple[str, ...] | None]:
    """``load_dataset`` keyword arguments for ``args.dataset`` from the data options, and the task subset."""
    kw: dict[str, Any] = {"split_seed": args.split_seed}
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else None
    size = None
    if args.image_size:
        try:
            h, w = (int(v) for v in args.image_size.lower().split("x"))
            size = (h, w)
        except ValueError as e:
            raise MergingError("bad_argument", f"--image-size expects HxW, got {args.image_size!r}") from e
    if args.dataset in ("folder", "celeba"):
        if not args.data_root:
            raise MergingError("bad_argument", f"--dataset {args.dataset} needs --data-root")
        if size:
            kw["size"] = size
        if args.channels:
            kw["channels"] = args.channels
        from merging.data.stream import LoaderConfig

        base = LoaderConfig()
        kw["stream"] = True if getattr(args, "stream", False) else False if getattr(args, "eager", False) else None
        kw["loader"] = LoaderConfig(
            workers=base.workers if getattr(args, "loader_workers", None) is None else args.loader_workers,
            cache_mb=base.cache_mb if getattr(args, "cache_mb", None) is None else args.cache_mb,
        )
    if args.dataset in ("scenes", "glyphs") and size:
        kw["size"] = size
    if args.dataset == "digits":
        kw["tasks"] = tasks
    elif args.dataset == "folder":
        kw.update(root=args.data_root, labels_csv=args.labels_csv, tasks=tasks)
    elif args.dataset == "celeba":
        if not args.attr_file or not args.task_groups:
            raise MergingError("bad_argument", "--dataset celeba needs --attr-file and --task-groups")
        kw.update(attr_file=args.attr_file, image_dir=args.data_root, task_groups=args.task_groups)
    return kw, tasks


def add_scale_args(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--amp``, ``--nproc``, ``--collective-timeout`` (see docs/scale.md)."""
    g = p.add_argument_group("scale")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (auto: a GPU when present)")
    g.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="mixed-precision training: bf16 (CPU or GPU) or fp16 (CUDA only)")
    g.add_argument("--nproc", type=int, default=None,
                   help="data-parallel ranks on this machine, launched through torchrun (gloo on CPU, NCCL on CUDA)")
    g.add_argument("--collective-timeout", type=float, default=None,
                   help="seconds a rank waits in a collective before the job fails "
                   "(default 60, or PAM_COLLECTIVE_TIMEOUT)")


def start_scale(args: argparse.Namespace) -> int | None:
    """Apply ``add_scale_args``' flags. With ``--nproc N > 1`` outside a launch, run the same command
    as N ranks through torchrun and return the job's exit code; otherwise set the run's device (and
    join the process group when launched by torchrun) and return None: the caller goes on."""
    from merging import distributed
    from merging.device import resolve_device, set_device

    device = resolve_device(args.device)
    if args.nproc is not None and args.nproc > 1 and not distributed.launched():
        argv = getattr(args, "argv", None)
        if argv is None:
            raise MergingError("bad_argument", "--nproc needs the command line (run through `pam`)")
        return distributed.launch(args.nproc, distributed.strip_nproc(argv), args.collective_timeout)
    device = distributed.init(device, args.collective_timeout)
    set_device(device, args.amp)
    return None


def add_arch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="lenet", help="architecture family: " + " | ".join(list_archs()))
    p.add_argument("--width-mult", type=float, default=1.0, help="scale every layer's width")


def arch_for(args: argparse.Namespace, splits: Any) -> Any:
    from merging.arch import create_arch

    pre = splits.preprocessing
    return create_arch(args.arch, in_channels=pre.channels, input_size=tuple(pre.size), width_mult=args.width_mult)


def cmd_train(args: argparse.Namespace) -> int:
    from merging.zoo import train_zoo

    launched = start_scale(args)
    if launched is not None:
        return launched
    splits = dataset_from_args(args)
    arch = arch_for(args, splits)
    from merging.train import TrainConfig

    cfg = TrainConfig(epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size)
    train_zoo(splits, arch, cfg, Path(args.out), verbose=True)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from merging.checkpoint import load_model
    from merging.cost import cost_table
    from merging.report import format_table
    from merging.tasks import set_name

    net = load_model(args.model)
    table = cost_table(net)
    if args.json:
        print(json.dumps({k: {"macs": c.macs, "params": c.params} for k, c in table.items()}, indent=2))
        return 0
    print(
        f"model: {args.model}  tasks: {', '.join(net.task_names)}  arch: {net.arch.family}"
        f"  input: {net.arch.in_channels}x{net.arch.input_size[0]}x{net.arch.input_size[1]}"
    )
    for l, groups in enumerate(net.layout):
        parts = ", ".join(f"{set_name(m, net.task_names)}:{w}" for m, w in groups.items())
        print(f"  layer {l} ({net.arch.layers[l].kind}): {parts}")
    print(format_table(["combination", "MACs", "params"], [[k, c.macs, c.params] for k, c in table.items()]))
    cert = (net.meta.get("pruned") or {}).get("certificate")
    if cert:
        print(f"budget certificate: {cert['images']:,} held-out check images, one-sided {cert['confidence']:.0%} "
              f"paired test, budget {cert['budget']:g} point(s); the smallest drop this check set can certify "
              "at each task's disagreement is budget - margin:")
        print(format_table(["task", "point drop", "upper bound", "disagreement %", "margin", "certifiable up to"],
                           [[t, c["drop"], c["upper"], 100 * c["disagreement"], c["margin"],
                             cert["budget"] - c["margin"]] for t, c in cert["tasks"].items()]))
    elif net.meta.get("pruned"):
        print("pruned without a held-out certification (certify_share 0)")
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from pam_app.bench.scale import main as scale_main

    scale_main(["--out", args.out, "--epochs", str(args.epochs), "--images", str(args.images)])
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("bench-scale", help="epoch time at 1 vs 2 processes (gloo) and loader RSS eager vs "
                       "streaming -> results/scale.{json,md}")
    p.add_argument("--out", default="results")
    p.add_argument("--epochs", type=int, default=4, help="timed fine-tuning epochs per process count")
    p.add_argument("--images", type=int, default=20_000, help="images in the generated folder")
    p.set_defaults(func=cmd_bench_scale)

    p = sub.add_parser("train", help="train one single-task network per task (the zoo)")
    add_dataset_args(p)
    add_arch_args(p)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/zoo", help="directory for <task>.json + <task>.pt")
    add_scale_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="print a model's groups and the MACs and parameters of every combination")
    p.add_argument("model", help="model config (<name>.json) or its stem")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
