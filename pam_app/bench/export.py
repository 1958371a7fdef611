"""``pam bench-export``: latency of every method of a bundle, side by side in one run.

Per method, median latency at batch 1 of: ExecuTorch XNNPACK with 1 and with 2 threads (each
thread count in its own process: the threadpool can only be sized before loading), eager PyTorch
(1 thread) and ONNX Runtime (1 thread, ``torch.onnx.export(dynamo=True)``) on the same combination
module, and, if given, a ``separate`` baseline bundle run task by task (one single-task method
after another). Ratios: ExecuTorch against eager and ONNX Runtime, latency per MAC, and the
baseline's latency and MACs against the bundle's.

``--case vgg64`` builds a VGG-style case at 64x64 (random weights, a merged structure against a
separate one) where compute, not call overhead, dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mobile_export.errors import ExportError
from pam_common.atomic import atomic_write_bytes, atomic_write_json

WARMUP = 20


def _median_ms(fn: Callable[[], Any], runs: int) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# ---------------------------------------------------------------------------- child processes
def _child_executorch(bundle: Path, threads: int, runs: int, sequences: dict[str, list[str]]) -> dict[str, Any]:
    """Median ms per method (or per sequence of methods run one after another)."""
    import torch

    from mobile_export.manifest import Manifest
    from mobile_export.runtime import check_program, set_threads, thread_count

    torch.set_num_threads(1)
    set_threads(threads)  # before anything is loaded
    manifest = Manifest.load(bundle)
    path = bundle / manifest.program
    check_program(path, manifest.program_sha256)
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path.read_bytes())
    x = torch.randn(1, *manifest.input.shape)
    loaded = {m.name: program.load_method(m.name) for m in manifest.methods}
    seqs = sequences or {m.name: [m.name] for m in manifest.methods}
    out: dict[str, float] = {}
    for key, names in seqs.items():
        methods = [loaded[n] for n in names]

        def call(methods: list[Any] = methods) -> None:
            for m in methods:
                m.execute([x])

        out[key] = _median_ms(call, runs)
    return {"threads": thread_count(), "median_ms": out}


def _child_eager_onnx(model: Path, runs: int, combos: list[str]) -> dict[str, Any]:
    """Median ms per combination: eager PyTorch and ONNX Runtime, 1 thread each."""
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    from merging.checkpoint import load_model

    torch.set_num_threads(1)
    net = load_model(model).eval()
    h, w = net.arch.input_size
    x = torch.randn(1, net.arch.in_channels, h, w)
    eager: dict[str, float] = {}
    onnx: dict[str, float] = {}
    errors: dict[str, str] = {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as d:
        for name in combos:
            module = net.for_combination(name.split("+")).eval()

            def run_eager(module: Any = module) -> None:
                with torch.inference_mode():
                    module(x)

            eager[name] = _median_ms(run_eager, runs)
            f = Path(d) / f"m{len(onnx) + len(errors)}.onnx"
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(module, (x,), str(f), dynamo=True, verbose=False)
                sess = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
                feed = {sess.get_inputs()[0].name: x.numpy()}
                got = sess.run(None, feed)
                want = module(x)
                err = max(float(np.abs(g - t.detach().numpy()).max()) for g, t in zip(got, want, strict=True))
                if err > 1e-4:
                    errors[name] = f"ONNX Runtime differs from eager by {err:.2e}"

                def run_onnx(sess: Any = sess, feed: Any = feed) -> None:
                    sess.run(None, feed)

                onnx[name] = _median_ms(run_onnx, runs)
            except Exception as e:  # the ONNX exporter raises many types; a column gap, not a failed bench
                errors[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return {"eager_ms": eager, "onnxruntime_ms": onnx, "errors": errors}


def _run_child(args: list[str], timeout_s: float = 1800.0) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "pam_app.bench.export", "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, errors="replace")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH "):
            return dict(json.loads(line[6:]))
    why = f"exit {proc.returncode}: {proc.stderr[-500:]}"
    raise ExportError("bench_failed", f"benchmark child {args[:2]} failed ({why})")


# ---------------------------------------------------------------------------- the benchmark
def _model_of(bundle: Path, given: str | None) -> Path | None:
    if given:
        return Path(given)
    rep = bundle / "report.json"
    if rep.is_file():
        p = json.loads(rep.read_text()).get("model_path")
        if p and Path(p).is_file():
            return Path(p)
    return None


def bench_bundle(
    bundle: Path, *, model: Path | None, separate: Path | None, runs: int, name: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from mobile_export.manifest import Manifest

    manifest = Manifest.load(bundle)
    combos = [m.name for m in manifest.methods]
    result: dict[str, Any] = {
        "case": name,
        "bundle": str(bundle),
        "model": str(model) if model else None,
        "separate": str(separate) if separate else None,
        "input": manifest.input.shape,
        "batch": 1,
        "runs": runs,
        "load_average_at_start": list(os.getloadavg()),
        "methods": {m.name: {"macs": m.macs, "params": m.params} for m in manifest.methods},
    }
    for threads in (1, 2):
        log(f"[{name}] ExecuTorch XNNPACK, {threads} thread(s) ...")
        r = _run_child(["et", str(bundle), str(threads), str(runs)])
        for k, v in r["median_ms"].items():
            result["methods"][k][f"executorch_{threads}t_ms"] = v
    if model is not None:
        log(f"[{name}] eager PyTorch and ONNX Runtime (1 thread) ...")
        r = _run_child(["eager", str(model), str(runs), ",".join(combos)])
        for k in combos:
            result["methods"][k]["eager_ms"] = r["eager_ms"].get(k)
            result["methods"][k]["onnxruntime_ms"] = r["onnxruntime_ms"].get(k)
        result["onnx_errors"] = r["errors"]
    if separate is not None:
        sep = Manifest.load(separate)
        sep_names = {m.name for m in sep.methods}
        seqs = {c: c.split("+") for c in combos}
        missing = sorted({t for ts in seqs.values() for t in ts} - sep_names)
        if missing:
            raise ExportError("bad_baseline", f"separate bundle {separate} lacks single-task methods {missing}")
        sep_macs = {m.name: m.macs for m in sep.methods}
        log(f"[{name}] separate baseline, task by task, ExecuTorch 1 thread ...")
        r = _run_child(["et", str(separate), "1", str(runs), json.dumps(seqs)])
        for k in combos:
            row = result["methods"][k]
            row["separate_1t_ms"] = r["median_ms"][k]
            row["separate_macs"] = sum(sep_macs[t] for t in seqs[k])
    result["load_average_at_end"] = list(os.getloadavg())
    result["export"] = export_summary(bundle)
    _ratios(result)
    return result


def export_summary(bundle: Path) -> dict[str, Any]:
    """Size and memory figures that ``pam export`` measured for this bundle (report.json)."""
    rep = bundle / "report.json"
    if not rep.is_file():
        return {}
    r = json.loads(rep.read_text())
    mem = r.get("memory") or {}
    return {"sizes": r.get("sizes"), "memory_unbounded": mem.get("unbounded"),
            "memory_max_loaded_1": mem.get("max_loaded_1"), "lite_status": r.get("lite_status")}


def _ratios(result: dict[str, Any]) -> None:
    for row in result["methods"].values():
        et1 = row.get("executorch_1t_ms")
        if et1 is None:
            continue
        row["ns_per_mac_1t"] = et1 * 1e6 / row["macs"] if row["macs"] else None
        for key, label in (
            ("executorch_2t_ms", "et1_over_et2"),
            ("eager_ms", "et1_over_eager"),
            ("onnxruntime_ms", "et1_over_onnxruntime"),
        ):
            if row.get(key):
                row[label] = et1 / row[key]
        if row.get("separate_1t_ms"):
            row["latency_ratio_separate_over_this"] = row["separate_1t_ms"] / et1
            row["mac_ratio_separate_over_this"] = row["separate_macs"] / row["macs"] if row["macs"] else None


def to_markdown(result: dict[str, Any]) -> str:
    def f(v: Any, spec: str = ".3f") -> str:
        return "" if v is None else format(v, spec)

    head = (
        "| method | MACs | ET 1t ms | ET 2t ms | eager ms | ORT ms | ET1/eager | ET1/ORT | ns/MAC | "
        "separate ms | sep/this latency | sep/this MACs |"
    )
    lines = [
        f"### {result['case']}",
        "",
        f"input {result['input']}, batch 1, median of {result['runs']} runs after {WARMUP} warm-up; "
        f"load average {result['load_average_at_start'][0]:.1f} at start (2 shared cores)",
        "",
        head,
        "|" + "|".join(["---"] * (head.count("|") - 1)) + "|",
    ]
    for name, r in result["methods"].items():
        lines.append(
            f"| {name} | {r['macs']:,} | {f(r.get('executorch_1t_ms'))} | {f(r.get('executorch_2t_ms'))} | "
            f"{f(r.get('eager_ms'))} | {f(r.get('onnxruntime_ms'))} | {f(r.get('et1_over_eager'), '.2f')} | "
            f"{f(r.get('et1_over_onnxruntime'), '.2f')} | {f(r.get('ns_per_mac_1t'), '.2f')} | "
            f"{f(r.get('separate_1t_ms'))} | {f(r.get('latency_ratio_separate_over_this'), '.2f')} | "
            f"{f(r.get('mac_ratio_separate_over_this'), '.2f')} |"
        )
    sizes = (result.get("export") or {}).get("sizes")
    if sizes:
        lines += [
            "",
            f"model.pte {sizes['program_bytes'] / 1e3:.1f} KB with all {len(result['methods'])} methods; "
            f"the all-task method alone {sizes['all_task_only_bytes'] / 1e3:.1f} KB (ratio {sizes['ratio']:.3f}); "
            f"parameters {sizes['parameters_bytes'] / 1e3:.1f} KB.",
        ]
    mem = (result.get("export") or {}).get("memory_unbounded")
    bounded = (result.get("export") or {}).get("memory_max_loaded_1")
    if mem and "error" not in mem:
        text = (
            f"RSS: program loaded {mem['rss_program_mb']:.1f} MB; with {mem['one_method']} "
            f"{mem['rss_one_method_mb']:.1f} MB; all {mem['methods']} methods {mem['rss_all_methods_mb']:.1f} MB"
        )
        if bounded and "error" not in bounded:
            text += f"; at most 1 loaded (LRU) {bounded['rss_all_methods_mb']:.1f} MB"
        lines.append(text + ".")
    if result.get("onnx_errors"):
        lines += ["", "ONNX notes: " + "; ".join(f"{k}: {v}" for k, v in result["onnx_errors"].items())]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"export-bench-{result['case']}"
    jp, mp = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    atomic_write_json(jp, result)
    atomic_write_bytes(mp, to_markdown(result).encode())
    return jp, mp


# ---------------------------------------------------------------------------- entry points
def run_cli(args: argparse.Namespace) -> int:
    from pam_app.bench.export_cases import build_mobilenetv2_case, build_vgg64_case

    out_dir = Path(args.out)
    if args.case == "vgg64":
        bundle, model_path, separate_path = build_vgg64_case(Path(args.root))
        model: Path | None = model_path
        separate: Path | None = separate_path
        name = args.name or "vgg64"
    elif args.case == "mobilenetv2-64":
        bundle, model_path, separate_path = build_mobilenetv2_case(Path(args.root))
        model, separate = model_path, separate_path
        name = args.name or "mobilenetv2-64"
    elif args.bundle is None:
        raise ExportError("bad_argument", "give a BUNDLE_DIR or --case vgg64")
    else:
        bundle = Path(args.bundle)
        model = _model_of(bundle, args.model)
        separate = Path(args.separate) if args.separate else None
        name = args.name or bundle.name
    result = bench_bundle(bundle, model=model, separate=separate, runs=args.runs, name=name)
    jp, mp = write_results(result, out_dir)
    print(to_markdown(result))
    print(f"wrote {jp} and {mp}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        kind, rest = argv[1], argv[2:]
        if kind == "et":
            seqs = json.loads(rest[3]) if len(rest) > 3 else {}
            res = _child_executorch(Path(rest[0]), int(rest[1]), int(rest[2]), seqs)
        elif kind == "eager":
            res = _child_eager_onnx(Path(rest[0]), int(rest[1]), rest[2].split(","))
        else:
            raise SystemExit(f"unknown child {kind}")
        print("BENCH " + json.dumps(res), flush=True)
        return 0
    print("usage: pam bench-export BUNDLE_DIR | pam bench-export --case vgg64", file=sys.stderr)
    return 2

if __name__ == "__main__":
    sys.exit(main())
