"""Verification of a bundle: every method through the real ExecuTorch runtime against eager.

Against the model itself when it is given, else against the expected outputs stored in the
bundle at export time (``expected_outputs.pt``, ``reference.pt`` in bundles written before issue 21;
tensors only, checked against the manifest's sha256).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mobile_export.capture import example_input
from mobile_export.errors import ExportError
from mobile_export.manifest import Manifest
from mobile_export.runtime import BundleRuntime

if TYPE_CHECKING:
    from merging.network import MultitaskNet

TOLERANCE = 1e-4  # max abs error between ExecuTorch and eager outputs


def _expected(
    manifest: Manifest, bundle: Path, net: MultitaskNet | None, seed: int
) -> tuple[list[torch.Tensor], dict[str, list[list[torch.Tensor]]]]:
    """Inputs (batch 1 and the maximum batch) and, per method, the expected outputs for each."""
    names = [m.name for m in manifest.methods]
    if net is not None:
        xs = [example_input(net, b, seed=seed + 1) for b in sorted({1, manifest.input.max_batch})]
        with torch.no_grad():
            exp = {m.name: [list(net.for_combination(m.tasks).eval()(x)) for x in xs] for m in manifest.methods}
        return xs, exp
    xs, outs = _stored_expected_outputs(manifest, bundle, names)
    exp = {n: [[o[: len(xi)] for o in outs[n]] for xi in xs] for n in names}
    return xs, exp


def _stored_expected_outputs(
    manifest: Manifest, bundle: Path, names: list[str]
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The inputs (batch 1 and the whole sample) and eager outputs stored at export time. An older
    bundle's manifest names ``reference.pt`` (its legacy key is read as ``expected_outputs``)."""
    import hashlib

    if manifest.expected_outputs is None:
        raise ExportError("no_expected_outputs", "the bundle has no expected outputs; pass the model to verify against")
    path = bundle / manifest.expected_outputs
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ExportError("no_expected_outputs", f"cannot read {path}: {e}") from e
    if manifest.expected_outputs_sha256 and hashlib.sha256(data).hexdigest() != manifest.expected_outputs_sha256:
        raise ExportError("sha256_mismatch", f"{path} does not match the sha256 in the manifest")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: never unpickle code
        x = stored["x"]
        outs = stored["outputs"]
    except Exception as e:  # torch.load raises many types on bad files
        raise ExportError("bad_expected_outputs", f"{path} is not an expected-outputs file: "
                          f"{type(e).__name__}: {e}") from e
    missing = [n for n in names if n not in outs]
    if missing:
        raise ExportError("bad_expected_outputs", f"{path} lacks outputs for {missing}")
    return ([x[:1], x] if len(x) > 1 else [x]), outs


def _argmax_agrees(got: torch.Tensor, want: torch.Tensor, kind: str) -> bool:
    """Predictions equal wherever eager is not within the tolerance of a tie."""
    if kind == "attributes":  # one sigmoid per label: the prediction is the sign of each logit
        clear = want.abs() > TOLERANCE
        return bool(((got > 0) == (want > 0))[clear].all())
    top2 = want.topk(min(2, want.shape[1]), dim=1).values
    clear = (top2[:, 0] - top2[:, -1]) > 2 * TOLERANCE if want.shape[1] > 1 else torch.ones(len(want), dtype=torch.bool)
    return bool((got.argmax(1) == want.argmax(1))[clear].all())


def verify_bundle(
    bundle_dir: str | Path, net: MultitaskNet | None = None, *, seed: int = 0, strict: bool = True,
    on_method: Callable[[str], None] | None = None, max_loaded: int | None = 1,
) -> dict[str, Any]:
    """Check sha256, then run every method at batch 1 and the maximum batch and compare with
    eager. Returns a report; with ``strict`` a mismatch raises :class:`ExportError`."""
    bundle = Path(bundle_dir)
    # refuses a program that does not match its sha256; one method loaded at a time (each loaded
    # method keeps its own packed weights, so RSS would grow with the number of methods)
    rt = BundleRuntime(bundle, lazy=True, max_loaded=max_loaded)
    manifest = rt.manifest
    xs, expected = _expected(manifest, bundle, net, seed)
    methods: dict[str, Any] = {}
    failures: list[str] = []
    for m in manifest.methods:
        worst, agree, problems = 0.0, True, []
        for x, want in zip(xs, expected[m.name], strict=True):
            got = rt.run(m.name, x)
            if len(got) != len(want) or len(got) != len(m.tasks):
                problems.append(f"{len(got)} outputs, expected {len(want)}")
                continue
            for task, g, w in zip(m.tasks, got, want, strict=True):
                if g.shape != w.shape:
                    problems.append(f"{task}: shape {tuple(g.shape)} != {tuple(w.shape)}")
                    continue
                worst = max(worst, float((g - w).abs().max()))
                agree = agree and _argmax_agrees(g, w, manifest.task(task).kind)
        if worst > TOLERANCE:
            problems.append(f"max abs error {worst:.3g} > {TOLERANCE}")
        if not agree:
            problems.append("predictions differ from eager")
        methods[m.name] = {"max_abs_err": worst, "predictions_equal": agree, "ok": not problems, "problems": problems}
        failures.extend(f"{m.name}: {p}" for p in problems)
        if on_method is not None:
            on_method(m.name)
    report = {
        "ok": not failures,
        "against": "model" if net is not None else "expected outputs",
        "batches": [len(x) for x in xs],
        "tolerance": TOLERANCE,
        "program_sha256_ok": True,
        "methods": methods,
        "failures": failures,
    }
    if strict and failures:
        raise ExportError("verification_failed", "; ".join(failures))
    return report


def measure_memory(
    bundle_dir: str | Path, timeout_s: float = 300.0, on_child: Callable[[], None] | None = None
) -> dict[str, Any]:
    """RSS of loading one method against all (fresh child processes): unbounded, and with at
    most one method kept loaded (the lazy LRU loader)."""
    out: dict[str, Any] = {}
    for key, max_loaded in (("unbounded", None), ("max_loaded_1", 1)):
        out[key] = _memory_child(bundle_dir, max_loaded, timeout_s)
        if on_child is not None:
            on_child()
    u = out["unbounded"]
    if "error" not in u:
        out["per_method_mb"] = round((u["rss_all_methods_mb"] - u["rss_program_mb"]) / max(1, u["methods"]), 2)
    return out


def _memory_child(bundle_dir: str | Path, max_loaded: int | None, timeout_s: float) -> dict[str, Any]:
    from mobile_export.runtime import run_probe_child

    args = ["--memory", str(bundle_dir)] + ([] if max_loaded is None else [str(max_loaded)])
    try:
        proc = run_probe_child(args, timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"memory probe timed out after {timeout_s:.0f} s"}
    from mobile_export.runtime import PROBE_MARK

    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            return dict(json.loads(line[len(PROBE_MARK) :]))
    return {"error": f"memory probe failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
