"""``pam export``, ``pam verify``, ``pam probe``, ``pam bench-export`` (parser side kept light)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mobile_export.errors import ExportError

USER_ERRORS: tuple[type[BaseException], ...] = (ExportError,)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _add_export(sub)
    _add_verify(sub)
    _add_bench(sub)


def _add_export(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "export",
        help="export a multitask model to a bundle: model.pte (one method per combination), manifest, report",
    )
    p.add_argument("model", help="model saved with save_model (the .json)")
    p.add_argument("--out", required=True, help="bundle directory to write (built aside, then renamed)")
    p.add_argument(
        "--combinations",
        default=None,
        help="combinations to export, separated by ';' or ',', tasks joined by '+' "
        "(e.g. 'digit;digit+parity'); default all (required above 6 tasks)",
    )
    p.add_argument(
        "--combinations-from",
        default=None,
        metavar="FILE",
        help="export the combinations an app asks for: the service's Prometheus text (pam_requests_total), "
        "its JSON log lines, or a plain list (one combination per line, optionally with a count)",
    )
    p.add_argument(
        "--max-methods",
        type=int,
        default=None,
        metavar="K",
        help="with --combinations-from: the K most-requested combinations plus every single task",
    )
    p.add_argument("--max-batch", type=int, default=8, help="largest batch every method accepts")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes lowering methods side by side (default: one per core, at least 6 methods each; same bytes)",
    )
    p.add_argument(
        "--preprocessing",
        default=None,
        help="preprocessing to ship (overrides the model's own record): a data set name (digits, composite) "
        "or a JSON file (a zoo model, a manifest, a preprocessing object); default: the model's meta, "
        "else digits mean/std",
    )
    p.add_argument(
        "--accuracy-data",
        default=None,
        help="measure per-task test accuracy on this built-in data set (digits, digits-partitions, composite) "
        "for the manifest; default: what the model's meta records",
    )
    p.add_argument("--name", default=None, help="model name in the manifest (default: the model file's stem)")
    p.add_argument("--version", dest="model_version", default=None, help="model version (default: from weights sha256)")
    p.add_argument(
        "--lite",
        action="store_true",
        help="also write model.ptl for the TorchScript lite interpreter (deprecated upstream; off by default)",
    )
    p.add_argument(
        "--exporter",
        dest="exporters",
        action="append",
        default=[],
        metavar="NAME",
        help="also write the bundle in this registered format (repeatable; built in: torchscript-lite = --lite)",
    )
    p.add_argument("--no-lite", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    p.add_argument(
        "--measure",
        action="store_true",
        help="also measure sizes (lowers an all-task-only program) and RSS (child processes) for report.json",
    )
    p.add_argument("--no-measure", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.set_defaults(func=cmd_export)


def _add_verify(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    v = sub.add_parser("verify", help="check a bundle: sha256, every method through ExecuTorch against eager")
    v.add_argument("bundle", help="bundle directory")
    v.add_argument("--model", default=None, help="the model to compare with (default: the bundle's expected outputs)")
    v.add_argument("--probe", action="store_true", help="also load and run it in a child process first")
    v.set_defaults(func=cmd_verify)


def _add_bench(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    b = sub.add_parser(
        "bench-export",
        help="latency per method: ExecuTorch (1 and 2 threads), eager, ONNX Runtime, a separate baseline",
    )
    b.add_argument("bundle", nargs="?", default=None, help="bundle to measure")
    b.add_argument("--case", choices=["vgg64", "mobilenetv2-64"], default=None,
                   help="build and measure a built-in case instead")
    b.add_argument("--root", default="runs/export-bench", help="where --case writes its models and bundles")
    b.add_argument("--model", default=None, help="the bundle's model (eager and ONNX Runtime); default from provenance")
    b.add_argument("--separate", default=None, help="the `separate` baseline bundle, run task by task")
    b.add_argument("--separate-model", default=None, help="the separate baseline's model (for eager figures)")
    b.add_argument("--runs", type=int, default=200, help="timed runs per method and runtime")
    b.add_argument("--out", default="results", help="directory for export-bench-*.json|md")
    b.add_argument("--name", default=None, help="case name in the result files")
    b.set_defaults(func=cmd_bench)


def cmd_export(args: argparse.Namespace) -> int:
    from mobile_export.export import ExportConfig, export_bundle
    from mobile_export.selection import parse_combinations

    if args.combinations is not None and not parse_combinations(args.combinations):
        raise ExportError("empty_combination_list", "--combinations names no combination")
    combinations = parse_combinations(args.combinations) if args.combinations is not None else None
    if args.combinations_from is not None:
        if combinations is not None:
            raise ExportError("conflicting_options", "give --combinations or --combinations-from, not both")
        combinations = combinations_from(Path(args.model), args.combinations_from, args.max_methods)
    elif args.max_methods is not None:
        raise ExportError("conflicting_options", "--max-methods ranks by request counts: give --combinations-from")
    cfg = ExportConfig(
        combinations=combinations,
        max_batch=args.max_batch,
        lite=args.lite and not args.no_lite,
        exporters=tuple(args.exporters),
        measure=args.measure and not args.no_measure,
        memory=args.measure and not args.no_measure,
        workers=args.workers,
        progress=False if args.no_progress else None,
        preprocessing=args.preprocessing,
        accuracy_data=args.accuracy_data,
        model_name=args.name,
        model_version=args.model_version,
        force=args.force,
    )
    res = export_bundle(Path(args.model), Path(args.out), cfg)
    print(summarise(res.bundle_dir))
    return 0


def combinations_from(model: Path, path: str, max_methods: int | None) -> list[str]:
    """The combinations ``--combinations-from`` (and ``--max-methods``) select for ``model``."""
    from merging.checkpoint import load_model
    from merging.errors import MergingError
    from mobile_export.demand import select_combinations

    try:
        tasks = load_model(model).task_names
    except MergingError as e:
        raise ExportError(e.code, e.message) from e
    chosen, fmt, counts = select_combinations(path, tasks, max_methods)
    print(f"--combinations-from {path} ({fmt}, {len(counts)} combination(s) requested): exporting {len(chosen)}")
    return chosen


def summarise(bundle: Path) -> str:
    from mobile_export.manifest import REPORT_FILE, Manifest

    m = Manifest.load(bundle)
    rep_path = bundle / REPORT_FILE
    rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    lines = [f"bundle {bundle}: {m.model_name} {m.model_version}, {len(m.methods)} methods"]
    lines[0] += f", max batch {m.input.max_batch}"
    ver = rep.get("verification", {}).get("methods", {})
    lines.append(f"  {'method':<32} {'MACs':>12} {'params':>10} {'max |err|':>10}")
    for e in m.methods:
        err = ver.get(e.name, {}).get("max_abs_err")
        lines.append(f"  {e.name:<32} {e.macs:>12,} {e.params:>10,} {'' if err is None else f'{err:.1e}':>10}")
    sizes = rep.get("sizes")
    if sizes:
        lines.append(
            f"  model.pte {sizes['program_bytes'] / 1e6:.3f} MB; all-task method alone "
            f"{sizes['all_task_only_bytes'] / 1e6:.3f} MB (ratio {sizes['ratio']:.3f})"
        )
    mem = rep.get("memory", {}).get("unbounded")
    if mem and "error" not in mem:
        lines.append(
            f"  RSS: program {mem['rss_program_mb']:.1f} MB, + {mem['one_method']} {mem['rss_one_method_mb']:.1f} MB,"
            f" all methods {mem['rss_all_methods_mb']:.1f} MB"
        )
    lines.append(f"  model.ptl: {m.lite_status}")
    lines.append(f"  preprocessing: {m.preprocessing_source}")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    from mobile_export.verify import verify_bundle

    if args.probe:
        from mobile_export.runtime import probe_bundle

        pr = probe_bundle(args.bundle)
        if not pr.ok:
            raise ExportError("probe_failed", pr.error or "probe failed")
        print(f"probe: ok, {len(pr.methods)} methods ran in a child process (RSS {pr.rss_mb:.0f} MB)")
    net = None
    if args.model:
        from merging.checkpoint import load_model
        from merging.errors import MergingError

        try:
            net = load_model(args.model)
        except MergingError as e:
            raise ExportError(e.code, e.message) from e
    rep = verify_bundle(args.bundle, net=net, strict=False)
    for name, r in rep["methods"].items():
        status = "ok" if r["ok"] else "FAIL: " + "; ".join(r["problems"])
        print(f"  {name:<32} max |err| {r['max_abs_err']:.1e}  {status}")
    if not rep["ok"]:
        raise ExportError("verification_failed", f"{len(rep['failures'])} problem(s): {'; '.join(rep['failures'])}")
    print(f"verified {len(rep['methods'])} methods against {rep['against']} (batches {rep['batches']}, sha256 ok)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pam_app.bench.export import run_cli

    return run_cli(args)
