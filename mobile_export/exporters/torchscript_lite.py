"""``model.ptl``: the combinations for the TorchScript lite interpreter (``--lite``; deprecated
upstream). One traced method per combination (``run_a__b`` for ``a+b``); shipped only if the lite
interpreter loads it back and every method matches eager at batch 1 and the maximum."""

from __future__ import annotations

import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from mobile_export.capture import example_input
from mobile_export.exporters.base import Artifact, Check, Exporter, ExportJob
from mobile_export.exporters.registry import register_exporter
from pam_common.combinations import combination_name

TOLERANCE = 1e-4  # max abs error between a lite method and eager
LITE_OFF = "not produced: off by default (TorchScript lite is deprecated upstream); pam export --lite writes it"


def lite_method_names(combos: Sequence[tuple[str, ...]]) -> dict[str, str]:
    """TorchScript method names must be identifiers: ``age+gender`` -> ``run_age__gender``."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for combo in combos:
        base = "run_" + "__".join(re.sub(r"\W", "_", t) for t in combo)
        name, i = base, 1
        while name in used:
            name, i = f"{base}_{i}", i + 1
        used.add(name)
        out[combination_name(combo)] = name
    return out


@register_exporter
class TorchScriptLiteExporter(Exporter):
    name: ClassVar[str] = "torchscript-lite"
    suffix: ClassVar[str] = ".ptl"
    required: ClassVar[bool] = False
    verify_phase: ClassVar[str] = "lite_verify"

    def __init__(self, check_trace: bool = False) -> None:
        # The tracer's own check (check_trace=True, what the export did before issue 13) traces every
        # method a second time and compares; the reload-and-compare of verify() covers it.
        self.check_trace = check_trace

    def export(self, job: ExportJob) -> Artifact:
        names = lite_method_names(job.combos)
        ok = f"ok: traced with torch {torch.__version__}, reloaded by the lite interpreter and matched eager"
        with job.phases.phase("lite", len(job.combos)) as bar:
            try:
                data = self._trace(job, names, on_method=lambda: bar.update(1))
            except Exception as e:  # TorchScript's tracer/lite saver raise many types; any means "no .ptl"
                why = f"torch {torch.__version__} failed to build it ({type(e).__name__}: {e})"
                return Artifact(self.name, self.file_name, None, f"not produced: {why}")
        return Artifact(self.name, self.file_name, data, ok, names)

    def _trace(self, job: ExportJob, names: dict[str, str], on_method: Any) -> bytes:
        subs = {names[combination_name(c)]: job.net.for_combination(c).eval() for c in job.combos}

        def _make(key: str) -> Any:
            def method(self: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return self.subs[key](x)  # type: ignore[index,no-any-return,operator]

            return method

        wrapper = type("LiteBundle", (nn.Module,), {k: _make(k) for k in subs})()
        wrapper.subs = nn.ModuleDict(subs)
        x = example_input(job.net, min(2, job.max_batch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace_module(wrapper, {k: (x,) for k in subs}, check_trace=self.check_trace)
            for _ in subs:
                on_method()
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / self.file_name
                traced._save_for_lite_interpreter(str(path))
                return path.read_bytes()

    def verify(self, artifact: Artifact, bundle: Path, job: ExportJob) -> Check:
        from torch.jit.mobile import _load_for_lite_interpreter

        report: dict[str, Any] = {}
        with job.phases.phase(self.verify_phase, len(job.combos)) as bar, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loaded = _load_for_lite_interpreter(str(bundle / artifact.file))
            except Exception as e:  # the lite loader raises many types
                return Check(f"torch {torch.__version__} failed to reload it ({type(e).__name__}: {e})")
            for c in job.combos:
                key = artifact.methods[combination_name(c)]
                sub, worst = job.net.for_combination(c).eval(), 0.0
                for b in sorted({1, job.max_batch}):
                    xb = example_input(job.net, b, seed=1)
                    with torch.no_grad():
                        got, want = loaded.run_method(key, xb), sub(xb)
                    got = got if isinstance(got, tuple) else (got,)
                    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
                        return Check(f"lite method {key} differs from eager at batch {b}", report)
                    worst = max([worst, *(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))])
                    if worst > TOLERANCE:
                        return Check(f"lite method {key} differs from eager at batch {b}", report)
                report[key] = {"max_abs_err": worst}
                bar.update(1)
        return Check(None, report)

    def manifest_fields(self, artifact: Artifact | None) -> dict[str, Any]:
        if artifact is None:
            return {"lite_program": None, "lite_status": LITE_OFF}
        return {"lite_program": artifact.file if artifact.produced else None, "lite_status": artifact.status}

    def method_fields(self, artifact: Artifact, method: str) -> dict[str, Any]:
        return {"lite_method": artifact.methods.get(method)} if artifact.produced else {}
