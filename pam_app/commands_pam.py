"""``pam merge``, ``pam prune``, ``pam bench``: merging, pruning and the benchmark (parser side kept light)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from merging.arch import list_archs
from merging.errors import MergingError
from merging.pruning.criteria import CRITERIA
from pam_app.commands_merging import (
    add_data_options,
    add_dataset_args,
    add_scale_args,
    dataset_from_args,
    dataset_kwargs,
    start_scale,
)

USER_ERRORS: tuple[type[BaseException], ...] = (MergingError,)
BENCH_DATASETS = ("digits", "digits-partitions", "composite", "glyphs")


def _print_costs(net: Any, baseline: Any = None) -> None:
    from merging.cost import cost_table
    from merging.report import format_table
    from merging.tasks import set_name

    for l, groups in enumerate(net.layout):
        parts = ", ".join(f"{set_name(m, net.task_names)}:{w}" for m, w in groups.items())
        print(f"  layer {l}: {parts}")
    table = cost_table(net)
    if baseline is None:
        print(format_table(["combination", "MACs", "params"], [[k, c.macs, c.params] for k, c in table.items()]))
        return
    base = cost_table(baseline)
    rows = [[k, c.macs, base[k].macs, f"{base[k].macs / c.macs:.2f}x"] for k, c in table.items()]
    print(format_table(["combination", "MACs", "before", "reduction"], rows))


def _pam_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key in ("delta", "noise", "calib_size", "split", "consistency", "min_keep"):
        v = getattr(args, key, None)
        if v is not None:
            opts[key] = v
    return opts


def cmd_merge(args: argparse.Namespace) -> int:
    from merging.checkpoint import save_model
    from merging.distributed import is_main
    from merging.mergers import create_merger
    from merging.zoo import load_zoo

    launched = start_scale(args)
    if launched is not None:
        return launched
    splits = dataset_from_args(args)
    nets = load_zoo(Path(args.zoo), tuple(t.name for t in splits.tasks))
    opts = _pam_options(args) if args.method == "pam" else {}
    merged = create_merger(args.method, **opts).merge(nets, splits.train, seed=args.seed)
    merged.meta.setdefault("dataset", splits.name)
    merged.meta.setdefault("preprocessing", splits.preprocessing.to_json())
    if not is_main():  # every rank merged the same network; rank 0 writes and reports it
        return 0
    path = save_model(merged, Path(args.out))
    print(f"merged {len(nets)} networks with {args.method} -> {path}")
    if args.method == "pam":
        print(f"  exactly reproduced before fine-tuning: {', '.join(merged.meta['pam']['exact_tasks']) or 'none'}")
    _print_costs(merged)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from merging.checkpoint import load_model, save_model
    from merging.distributed import is_main
    from merging.pruning import PruneConfig, check_set, missed_at_start, prune, reference_accuracy
    from merging.pruning.budget import resolution_line
    from merging.train import evaluate
    from merging.zoo import load_zoo

    launched = start_scale(args)
    if launched is not None:
        return launched
    net = load_model(args.model)
    args.tasks = ",".join(net.task_names)
    splits = dataset_from_args(args)
    cfg = PruneConfig(budget=args.budget, step=args.step, finetune_epochs=args.finetune_epochs, seed=args.seed,
                      criterion=args.criterion, price="none" if args.cost_blind else "share")
    if args.max_steps is not None:
        cfg = replace(cfg, max_steps=args.max_steps)
    if args.recover_epochs is not None:
        cfg = replace(cfg, recover_epochs=args.recover_epochs)
    reference = None
    if args.zoo:
        zoo = load_zoo(Path(args.zoo), net.task_names)
        reference = reference_accuracy(zoo, check_set(splits.val, cfg.check_shifts, cfg.seed, cfg.shift_below))
        if is_main():
            print("reference (unpruned single-task, val check set): "
                  + ", ".join(f"{t} {a:.2f}%" for t, a in reference.items()))
    before = load_model(args.model)
    if is_main():
        print(resolution_line(len(splits.val), cfg.confidence, cfg.budget) + " (half held out to certify)")
    pruned, history = prune(net, splits, cfg, reference=reference)
    if not is_main():  # every rank pruned to the same network; rank 0 writes and reports it
        return 0
    stop: dict[str, Any] = next((h for h in reversed(history) if h.get("kind") == "stop"), {})
    steps = sum(1 for h in history if h.get("accepted"))
    print(f"{steps} prune steps accepted; stopped: {stop.get('reason', '?')}")
    if missed_at_start(history) and net.meta.get("merger") == "pam":
        from merging.mergers.pam import PamConfig, PamMerger

        larger = PamMerger(PamConfig(**net.meta["pam"]["config"])).larger()
        again = (f"`pam merge --min-keep {larger.config.min_keep:g}`" if isinstance(larger, PamMerger)
                 else "`pam merge --method separate`")
        print(f"  the PAM merge kept too little for retraining to meet the budget: merge again with {again} "
              f"(`pam bench` and `pam demo` do this themselves)")
    if missed_at_start(history):
        last: dict[str, Any] = next((h for h in reversed(history) if "drop_upper" in h), {})
        worst: dict[str, float] = last.get("drop_upper", {})
        raise MergingError("budget_missed", f"{args.model} misses the {cfg.budget:g}-point budget before pruning "
                           f"(upper bounds of the drop: {', '.join(f'{t} {u:.2f}' for t, u in worst.items())}); "
                           f"nothing written to {args.out}")
    cert = pruned.meta.get("pruned", {}).get("certificate")
    if cert:
        print(f"certified on {cert['images']:,} held-out images at {cert['confidence']:.0%}: "
              + ", ".join(f"{t} drop {c['drop']:.2f} (upper {c['upper']:.2f}, +-{c['margin']:.2f})"
                          for t, c in cert["tasks"].items()))
    print("test accuracy: " + ", ".join(f"{t} {a:.2f}%" for t, a in evaluate(pruned, splits.test).items()))
    pruned.meta["prune_history"] = [{k: v for k, v in h.items() if k != "reference"} for h in history]
    path = save_model(pruned, Path(args.out))
    print(f"pruned model -> {path}")
    _print_costs(pruned, before)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pam_app.bench.files import combine
    from pam_app.bench.schedule import ROUTE_SCHEDULES, BenchConfig, quick_config
    from pam_app.bench.seed import run_bench

    launched = start_scale(args)
    if launched is not None:
        return launched
    if args.combine:
        paths = [Path(p) for p in args.combine.split(",")]
        combine(paths, Path(args.out or paths[0].parent))
        return 0
    datasets = BENCH_DATASETS if args.dataset == "all" else tuple(args.dataset.split(","))
    mergers = tuple(m.strip() for m in args.mergers.split(",") if m.strip()) if args.mergers else ()
    for ds in datasets:
        cfg = quick_config(ds) if args.quick else BenchConfig(dataset=ds)
        if ds in ("folder", "celeba"):  # the user's own data, decoded into memory (jobs run in worker processes)
            kw, _ = dataset_kwargs(argparse.Namespace(**{**vars(args), "dataset": ds}))
            kw.pop("split_seed", None)
            cfg = replace(cfg, dataset_args={**kw, "stream": False})
        elif ds in ("scenes", "glyphs") and args.image_size:  # generated data drawn at another size
            kw, _ = dataset_kwargs(argparse.Namespace(**{**vars(args), "dataset": ds}))
            cfg = replace(cfg, dataset_args={"size": kw["size"]})
        cfg = replace(cfg, split_seed=args.split_seed)
        out = args.out or ("results/quick" if args.quick else "results")  # quick runs never overwrite the full run
        cfg = replace(cfg, mergers=mergers, out_dir=Path(out), arch=args.arch or cfg.arch)
        if args.seeds is not None:
            cfg = replace(cfg, seeds=tuple(range(args.seeds)))
        if args.zoo_epochs is not None:
            cfg = replace(cfg, zoo_epochs=args.zoo_epochs)
        if args.width_mult is not None:
            cfg = replace(cfg, width_mult=args.width_mult)
        if args.tasks:
            cfg = replace(cfg, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()))
        if args.seed_list:
            cfg = replace(cfg, seeds=tuple(int(s) for s in args.seed_list.split(",")))
        if args.alone_routes:
            cfg = replace(cfg, routes=tuple(args.alone_routes.split(",")))
        if args.spec_sizes:
            cfg = replace(cfg, spec_sizes=tuple(int(k) for k in args.spec_sizes.split(",")))
        if args.workers is not None:
            cfg = replace(cfg, workers=args.workers)
        if args.library_pruner or args.route_schedule:
            cfg = replace(cfg, prune=ROUTE_SCHEDULES["library" if args.library_pruner else args.route_schedule])
        if args.save_models:
            cfg = replace(cfg, save_models=Path(args.save_models))
        run_bench(cfg)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge a zoo of single-task networks into one multitask network")
    p.add_argument("--zoo", required=True, help="zoo directory (from `pam train`)")
    p.add_argument("--method", default="pam", help="merger: pam | separate | shared | any registered one")
    p.add_argument("--out", required=True, help="output stem (writes STEM.json + STEM.pt)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("pam")
    g.add_argument("--delta", type=float, default=None, help="relevant sets keep (1 - delta) of the information")
    g.add_argument("--noise", type=float, default=None, help="kernel variance per dimension of the MI estimate")
    g.add_argument("--calib-size", type=int, default=None, help="calibration images")
    g.add_argument("--split", choices=("general", "two-level"), default=None, help="grouping form")
    g.add_argument("--consistency", choices=("cut", "expand"), default=None, help="how sets obey the wiring rule")
    g.add_argument("--min-keep", type=float, default=None,
                   help="floor of each task's set per layer, as a share of its own network's width (default 0.25)")
    add_dataset_args(p)
    add_scale_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("prune", help="structured pruning of a (multitask) model within an accuracy budget")
    p.add_argument("model", help="model config (<name>.json) or its stem")
    p.add_argument("--out", required=True, help="output stem (writes STEM.json + STEM.pt)")
    p.add_argument("--zoo", default=None, help="zoo whose unpruned networks set the reference accuracy "
                   "(default: the model's own accuracy before pruning)")
    p.add_argument("--budget", type=float, default=1.0, help="max accuracy drop per task, in points")
    p.add_argument("--step", type=float, default=0.15, help="share of combination-weighted MACs cut per step")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--recover-epochs", type=int, default=None,
                   help="retraining of a start network that misses the budget, per round (default 20; 0: none)")
    p.add_argument("--criterion", choices=tuple(CRITERIA), default="taylor+magnitude")
    p.add_argument("--cost-blind", action="store_true", help="ignore each channel's cost across combinations")
    p.add_argument("--seed", type=int, default=0)
    add_dataset_args(p)
    add_scale_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("bench", help="separate vs shared vs pam (vs any registered merger): MACs of every "
                       "combination after the same pruning, over seeds")
    p.add_argument("--dataset", default="all", help=f"{' | '.join(BENCH_DATASETS)} | all | comma-separated")
    p.add_argument("--quick", action="store_true", help="CI mode: 2 seeds, short training")
    p.add_argument("--mergers", default=None, help="comma-separated mergers (default: every registered merger)")
    p.add_argument("--arch", default=None, help="zoo architecture family (default lenet): " + " | ".join(list_archs()))
    p.add_argument("--width-mult", type=float, default=None, help="the family's width multiplier (default 1)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the data set's tasks (default all)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5, quick 2)")
    p.add_argument("--zoo-epochs", type=int, default=None, help="training epochs per single-task network")
    p.add_argument("--seed-list", default=None, help="explicit seeds, e.g. 2,3 (to split a run over processes)")
    p.add_argument("--alone-routes", default=None,
                   help="c_alone routes: project,torch-pruning,width-grid (default all)")
    p.add_argument("--spec-sizes", default=None, help="combination sizes with a specialist, -1 = all tasks "
                   "(default 2,-1; quick -1)")
    p.add_argument("--route-schedule", choices=("baseline", "b128", "fast", "library"), default=None,
                   help="the routes' and specialists' pruning schedule: baseline (the one c_alone's project route "
                   "uses, 10%% steps down to 2%%, 5+15 epochs; default), b128 (the same in batches of 128 with the "
                   "retry in 3 judged parts: faster on 8x8 digits, the routes measured weaker), fast (15%% steps "
                   "down to 4%%, 3+9 epochs: "
                   "weaker than the baseline), library (10%% steps, 5+5)")
    p.add_argument("--library-pruner", action="store_true", help="= --route-schedule library")
    p.add_argument("--combine", default=None, help="comma-separated bench-*.json of one data set and distinct seeds: "
                   "merge them into one report (in --out, default the first one's directory)")
    p.add_argument("--out", default=None, help="directory for bench-<dataset>.{json,md,png} "
                   "(default results/, or results/quick/ with --quick)")
    p.add_argument("--workers", type=int, default=None, help="processes for a seed's independent jobs "
                   "(default: one per core)")
    p.add_argument("--save-models", default=None, help="directory for every seed's pruned networks "
                   "(seed<k>-<route>[-own], seed<k>-separate), to export or serve the winner afterwards")
    add_data_options(p.add_argument_group("data (--dataset folder | celeba: your own images)"), tasks=False)
    add_scale_args(p)
    p.set_defaults(func=cmd_bench)
