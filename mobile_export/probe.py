"""Child-process side of :func:`mobile_export.runtime.probe_bundle`.

``python -m mobile_export.probe BUNDLE_DIR`` validates the manifest, checks the program, loads
it, runs every method on zeros at batch 1 and compares output shapes with the manifest. It prints
one ``PAM-PROBE-RESULT {json}`` line; if ExecuTorch aborts the process, the parent sees the exit
code instead. Imports nothing from ``merging``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _rss_mb() -> float | None:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss) / 2**20
    except Exception:  # psutil missing or /proc unreadable: RSS is informative only
        return None


def probe(bundle_dir: Path) -> dict[str, Any]:
    import torch

    from mobile_export.errors import ExportError
    from mobile_export.runtime import BundleRuntime

    try:
        rt = BundleRuntime(bundle_dir, lazy=True)
        spec = rt.manifest.input
        x = torch.zeros(1, *spec.shape, dtype=torch.float32)
        ran: list[str] = []
        for entry in rt.manifest.methods:
            outs = rt.run(entry.name, x)
            for task, out in zip(entry.tasks, outs, strict=True):
                want = (1, len(rt.manifest.task(task).labels))
                if tuple(out.shape) != want:
                    got = tuple(out.shape)
                    raise ExportError("bad_bundle", f"method {entry.name}: output {task} has shape {got}, not {want}")
                if not bool(torch.isfinite(out).all()):
                    raise ExportError("bad_bundle", f"method {entry.name}: output {task} is not finite on zeros")
            ran.append(entry.name)
        return {"ok": True, "error": None, "methods": ran, "rss_mb": _rss_mb()}
    except ExportError as e:
        return {"ok": False, "error": str(e), "methods": [], "rss_mb": _rss_mb()}


def memory(bundle_dir: Path, max_loaded: int | None) -> dict[str, Any]:
    """RSS (MB) with the program loaded but no method, with the costliest method loaded and run,
    then with every method loaded and run (at most ``max_loaded`` kept)."""
    import gc

    import torch

    from mobile_export.runtime import BundleRuntime

    rt = BundleRuntime(bundle_dir, lazy=True, max_loaded=max_loaded)
    x = torch.zeros(1, *rt.manifest.input.shape, dtype=torch.float32)
    gc.collect()
    base = _rss_mb()
    order = sorted(rt.manifest.methods, key=lambda m: -m.macs)
    rt.run(order[0].name, x)
    gc.collect()
    one = _rss_mb()
    for m in order[1:]:
        rt.run(m.name, x)
    gc.collect()
    every = _rss_mb()
    return {
        "max_loaded": max_loaded,
        "rss_program_mb": base,
        "one_method": order[0].name,
        "rss_one_method_mb": one,
        "rss_all_methods_mb": every,
        "loaded_at_end": len(rt.loaded_methods()),
        "methods": len(order),
    }


def main(argv: list[str] | None = None) -> int:
    from mobile_export.runtime import PROBE_MARK

    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "--memory":
        limit = int(args[2]) if len(args) == 3 else None
        print(PROBE_MARK + json.dumps(memory(Path(args[1]), limit)), flush=True)
        return 0
    if len(args) != 1:
        print("usage: python -m mobile_export.probe [--memory] BUNDLE_DIR [MAX_LOADED]", file=sys.stderr)
        return 2
    result = probe(Path(args[0]))
    print(PROBE_MARK + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
