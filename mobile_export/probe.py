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


def main(argv: list[str] | None = None) -> int:
    from mobile_export.runtime import PROBE_MARK

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mobile_export.probe BUNDLE_DIR", file=sys.stderr)
        return 2
    result = probe(Path(args[0]))
    print(PROBE_MARK + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
