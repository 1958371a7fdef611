"""Where export time goes: every phase, for N = 2..6 tasks of the demo's network family.

``python -m mobile_export.export_phases [--tasks 2,3,4,5,6] [--modes before,after,after-1w]
[--demo runs/demo/pam-pruned.json] [--out results]`` writes ``results/export-phases-<name>.json|md``.

The family: LeNet on 8x8 digits with one group per task at each layer (the demo's pruned network is
PAM falling back to ``separate`` on its default seed), widths those of the demo's pruned network
(a sixth task copies the first's), random weights (export time does not depend on their values).

Modes, each run in a fresh child process one after another, so peak RSS is each run's own:

- ``before``: what ``pam export`` did before issue 13, phase by phase: one ``torch.export`` per
  method, one ``to_edge_transform_and_lower`` call with the IR check, ``to_executorch``, the
  all-task-only program lowered again for the size ratio, the TorchScript-lite file traced with the
  tracer's own check (every method traced twice), verification, RSS probes in child processes;
- ``after``: today's default (``ExportConfig()``): methods lowered one by one over one process per
  core, merged into one program, verified; no lite file, no measurements;
- ``after-1w``: the same in one process (what the parallel lowering saves).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_MARK = "PAM-PHASES "
# The demo's pruned network (runs/demo/pam-pruned.json, default seed): channels per task and layer.
DEMO_WIDTHS = {
    "digit": (22, 34, 77), "parity": (22, 29, 59), "large": (23, 27, 40), "prime": (24, 29, 55),
    "loop": (24, 42, 74),
}
SIXTH = "p0"  # a sixth task (digits-partitions style, 2 labels) with the first task's widths


def family_net(n_tasks: int, seed: int = 0) -> Any:
    import torch

    from merging.arch import create_arch
    from merging.data.digits import DIGIT_TASKS
    from merging.network import MultitaskNet
    from merging.tasks import TaskSpec

    names = list(DEMO_WIDTHS)[: min(n_tasks, 5)]
    tasks = [TaskSpec(n, "classes", DIGIT_TASKS[n][0]) for n in names]
    widths = [DEMO_WIDTHS[n] for n in names]
    if n_tasks == 6:
        tasks.append(TaskSpec(SIXTH, "classes", ("a", "b")))
        widths.append(DEMO_WIDTHS["digit"])
    if not 1 <= n_tasks <= 6:
        raise ValueError(f"the family has 1 to 6 tasks, not {n_tasks}")
    layout = [{1 << i: w[layer] for i, w in enumerate(widths)} for layer in range(3)]
    torch.manual_seed(seed)
    return MultitaskNet(tasks, create_arch("lenet"), layout, meta={"merger": f"separate family N={n_tasks}"}).eval()


# ---------------------------------------------------------------------------- one run (child side)
def _before(net: Any, out: Path, lite: bool) -> dict[str, Any]:
    """The pre-issue-13 export, phase by phase (same calls as that code)."""
    from merging.tasks import all_combinations
    from mobile_export.capture import export_method
    from mobile_export.export import ExportConfig
    from mobile_export.exporters import ExportJob
    from mobile_export.exporters.torchscript_lite import TorchScriptLiteExporter
    from mobile_export.lowering import lower_serial
    from mobile_export.phases import Phases
    from mobile_export.verify import measure_memory, verify_bundle

    combos = all_combinations(net.task_names)
    ph = Phases()
    with ph.phase("torch_export", len(combos)):
        programs = {"+".join(c): export_method(net, c, 8) for c in combos}
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with ph.phase("to_edge_transform_and_lower", len(combos)):
        edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()])
    with ph.phase("to_executorch", len(combos)):
        et = edge.to_executorch()
    with ph.phase("serialize", 1):
        program = bytes(et.buffer)
    del edge, et, programs
    full = tuple(sorted(net.task_names))
    with ph.phase("measure_size", 1):
        lower_serial({"+".join(full): export_method(net, full, 8)}, check_ir=True)
    if lite:  # traced with the tracer's own check (every method traced twice), reloaded and compared
        lite_exporter = TorchScriptLiteExporter(check_trace=True)
        job = ExportJob(net, tuple(combos), 8, ph)
        art = lite_exporter.export(job)
        if art.data is None:
            raise RuntimeError(art.status)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / art.file).write_bytes(art.data)
            check = lite_exporter.verify(art, Path(d), job)
        if not check.ok:
            raise RuntimeError(check.problem)
    # the bundle around that program, written by export_bundle (its lowering replaced by the bytes above)
    import mobile_export.lowering as low
    from mobile_export.export import export_bundle

    saved = low.lower_methods, low.merge_methods
    low.lower_methods, low.merge_methods = (lambda *a, **k: []), (lambda methods: program)  # type: ignore[assignment]
    try:
        export_bundle(net, out, ExportConfig(verify=False, progress=False), log=lambda *_: None)
    finally:
        low.lower_methods, low.merge_methods = saved
    with ph.phase("verify", len(combos)):
        v = verify_bundle(out, net=net, strict=True, max_loaded=None)
    with ph.phase("measure_memory", 2):
        measure_memory(out)
    return {"phases": ph.as_dict(), "program_bytes": len(program), "verified": v["ok"]}


def _after(net: Any, out: Path, workers: int | None) -> dict[str, Any]:
    from mobile_export.export import ExportConfig, export_bundle

    res = export_bundle(net, out, ExportConfig(workers=workers, progress=False), log=lambda *_: None)
    rep = res.report
    return {"phases": rep["phases"], "program_bytes": (out / "model.pte").stat().st_size,
            "verified": rep["verification"]["ok"]}


def run_one(n_tasks: int, mode: str, model: str | None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    if model:
        from merging.checkpoint import load_model

        net = load_model(model).eval()
    else:
        net = family_net(n_tasks)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pam-phases-") as d:
        out = Path(d) / "bundle"
        if mode == "before":
            r = _before(net, out, lite=True)
        elif mode == "before-nolite":
            r = _before(net, out, lite=False)
        elif mode == "after":
            r = _after(net, out, None)
        elif mode == "after-1w":
            r = _after(net, out, 1)
        else:
            raise ValueError(f"unknown mode {mode}")
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    r.update({
        "tasks": n_tasks if not model else len(net.task_names),
        "methods": 2 ** len(net.task_names) - 1,
        "mode": mode,
        "wall_s": round(time.perf_counter() - t0, 2),
        "cpu_s": round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 1),
        "peak_rss_mb": round(own.ru_maxrss / 1024.0, 1),
        "peak_child_rss_mb": round(kids.ru_maxrss / 1024.0, 1),
    })
    return r


# ---------------------------------------------------------------------------- parent side
def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _child(n: int, mode: str, model: str | None, log: Path) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "mobile_export.export_phases", "--one", str(n), mode]
    if model:
        cmd += ["--demo", model]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            r: dict[str, Any] = json.loads(line[len(RESULT_MARK):])
            r["process_wall_s"] = round(time.perf_counter() - t0, 2)  # including imports
            return r
    return {"tasks": n, "mode": mode, "error": f"exit {proc.returncode}; see {log}"}


PHASE_ORDER = ["torch_export", "to_edge_transform_and_lower", "to_executorch", "lower", "serialize",
               "measure_size", "lite", "lite_verify", "verify", "measure_memory"]


def to_markdown(name: str, runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Export phases: {name}", "", f"{meta['note']}", "",
             f"Machine: {meta['cores']} cores; load average before {meta['load_before']}, after {meta['load_after']}. "
             "Wall seconds per phase (CPU seconds of this process and its children in brackets); "
             "`lower` = torch.export + to_edge_transform_and_lower + to_executorch per method, "
             "over the worker processes.", ""]
    phases = [p for p in PHASE_ORDER if any(p in r.get("phases", {}) for r in runs)]
    head = ["N", "methods", "mode", *phases, "total wall s", "process wall s", "peak RSS MB (largest child)", "pte KB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['tasks']} | | {r['mode']} | error: {r['error']} |")
            continue
        cells = [str(r["tasks"]), str(r["methods"]), r["mode"]]
        for p in phases:
            ph = r["phases"].get(p)
            cells.append("" if ph is None else f"{ph['wall_s']:.1f} ({ph['cpu_s'] + ph.get('child_cpu_s', 0):.0f})")
        cells += [f"{r['phases']['total_wall_s']:.1f}", f"{r['process_wall_s']:.1f}",
                  f"{r['peak_rss_mb']:.0f} ({r['peak_child_rss_mb']:.0f})", f"{r['program_bytes'] / 1024:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lower = [r for r in runs if "phases" in r and "lower" in r["phases"]]
    if lower:
        lines += ["", "Inside `lower` (per-method wall seconds summed over processes):", "",
                  "| N | mode | torch.export | to_edge_transform_and_lower | to_executorch | workers |",
                  "|---|---|---|---|---|---|"]
        for r in lower:
            p = r["phases"]["lower"]
            lines.append(f"| {r['tasks']} | {r['mode']} | {p['torch_export_s']:.1f} | "
                         f"{p['to_edge_transform_and_lower_s']:.1f} | {p['to_executorch_s']:.1f} | {p['workers']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="2,3,4,5,6", help="numbers of tasks of the family")
    ap.add_argument("--modes", default="before,after,after-1w", help="before, before-nolite, after, after-1w")
    ap.add_argument("--demo", default=None, help="export this model instead of the family (e.g. the demo's pruned)")
    ap.add_argument("--name", default="family", help="result file name: results/export-phases-<name>.*")
    ap.add_argument("--out", default="results")
    ap.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)  # child: N MODE
    args = ap.parse_args(argv)
    if args.one:
        r = run_one(int(args.one[0]), args.one[1], args.demo)
        print(RESULT_MARK + json.dumps(r), flush=True)
        return 0
    from pam_common.atomic import atomic_write_bytes, atomic_write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Path(tempfile.gettempdir()) / f"export-phases-{args.name}.log"  # the runs' stderr
    meta: dict[str, Any] = {
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_before": _load_average(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.demo or "family: LeNet 8x8, one group per task, the demo's pruned widths, random weights",
        "note": "Runs one after another in fresh child processes, in the order listed.",
    }
    runs: list[dict[str, Any]] = []
    for n in [int(t) for t in args.tasks.split(",")]:
        for mode in args.modes.split(","):
            r = _child(n, mode, args.demo, log)
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "phases"}), flush=True)
            meta["load_after"] = _load_average()
            atomic_write_json(out / f"export-phases-{args.name}.json", {"meta": meta, "runs": runs})
            atomic_write_bytes(out / f"export-phases-{args.name}.md", to_markdown(args.name, runs, meta).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
