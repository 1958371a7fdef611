"""The phases of one export, in order, over one :class:`ExportState`.

``plan`` -> ``run_exporters`` (ExecuTorch: ``lower`` + ``serialize``; lite: ``lite``) ->
``measure_size`` (``--measure``) -> ``write_files`` -> ``write_manifest`` -> ``verify_artifacts`` ->
``measure_memory`` (``--measure``) -> ``write_report`` -> ``publish``.

Every phase reads and fills the state; :func:`run` calls them and removes the half-built bundle
directory if one fails. The bundle is built in a temporary directory next to the destination,
verified there, and only then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mobile_export.capture import example_input
from mobile_export.config import PROGRAM_EXPORTER, ExportConfig
from mobile_export.errors import ExportError
from mobile_export.exporters import Artifact, Check, Exporter, ExportJob, exporter_names, get_exporter
from mobile_export.lowering import default_workers
from mobile_export.manifest import (
    EXPECTED_OUTPUTS_FILE,
    REPORT_FILE,
    InputSpec,
    Manifest,
    MethodEntry,
    Preprocessing,
    TaskEntry,
)
from mobile_export.phases import Phases
from pam_common.atomic import atomic_write_bytes, atomic_write_json
from pam_common.combinations import combination_name

if TYPE_CHECKING:
    from merging.network import MultitaskNet

LOG_FILE = "export.log"  # in the bundle: what the libraries printed during the export
# CPU seconds, for the estimate printed before a long export (digits demo network, 31 methods,
# results/export-speed.md): each lowering process first imports, exports and converts the base and
# warms up (~20 s with its first method), then lowers and emits each further method (~1.5 s).
SECONDS_PER_PROCESS = 20.0
SECONDS_PER_METHOD = 1.5
MIN_METHODS_PER_WORKER = 6  # below this many methods per process, a worker's start-up is not worth it


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: Manifest
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportState:
    """What one export carries from phase to phase: the inputs, then what each phase fills in."""

    net: MultitaskNet  # in eval mode, checked exportable
    model_path: Path | None  # the model's .json, when exported from a file
    out: Path  # the bundle directory to publish
    cfg: ExportConfig
    combos: list[tuple[str, ...]]  # canonical combinations, in request order
    preprocessing: Preprocessing
    preprocessing_source: str  # where the preprocessing came from (model, file, data set, default)
    accuracy: dict[str, float]  # task -> test accuracy in percent
    log: Callable[[str], object]  # progress lines for the user
    log_path: Path  # where the libraries' messages go while the export runs (moved into the bundle)
    phases: Phases  # time, CPU, peak RSS and progress bar of every phase
    exporters: list[Exporter]  # the formats to write, ExecuTorch first
    workers: int = 1  # lowering processes (plan)
    artifacts: dict[str, Artifact] = field(default_factory=dict)  # exporter name -> its file (run_exporters)
    checks: dict[str, Check] = field(default_factory=dict)  # exporter name -> its verification (verify_artifacts)
    tmp: Path | None = None  # the bundle being built, next to ``out`` (write_files)
    manifest: Manifest | None = None  # (write_manifest)
    report: dict[str, Any] = field(default_factory=dict)  # becomes report.json

    def job(self) -> ExportJob:
        return ExportJob(self.net, tuple(self.combos), self.cfg.max_batch, self.phases, self.workers,
                         self.log_path, self.cfg.seed)

    @property
    def bundle(self) -> Path:
        if self.tmp is None:
            raise AssertionError("the bundle directory is made by write_files")
        return self.tmp

    @property
    def program(self) -> bytes:
        data = self.artifacts[PROGRAM_EXPORTER].data
        if data is None:
            raise AssertionError("the ExecuTorch exporter always produces its program")
        return data


def run(state: ExportState) -> ExportResult:
    """Every phase in order; the bundle directory is removed if any of them fails."""
    plan(state)
    run_exporters(state)
    if state.cfg.measure:
        measure_size(state)
    try:
        write_files(state)
        write_manifest(state)
        verify_artifacts(state)
        if state.cfg.memory:
            measure_memory(state)
        write_report(state)
        publish(state)
    except BaseException:
        if state.tmp is not None:
            shutil.rmtree(state.tmp, ignore_errors=True)
        raise
    state.log(f"  {state.phases.summary()}")
    assert state.manifest is not None
    return ExportResult(state.out, state.manifest, state.report)


def plan(state: ExportState) -> None:
    """How many processes lower, and what the user is told before a long export."""
    n = len(state.combos)
    # A worker process costs ~20 CPU s (SECONDS_PER_PROCESS) before its first method: by default
    # one process per core, but only with at least MIN_METHODS_PER_WORKER methods each.
    auto = max(1, min(default_workers(), n // MIN_METHODS_PER_WORKER))
    state.workers = min(state.cfg.workers or auto, n)
    names = [combination_name(c) for c in state.combos]
    shown = ", ".join(names) if n <= 8 else ", ".join(names[:7]) + f", ... ({n - 7} more)"
    state.log(f"exporting {n} method(s) with {state.workers} process(es): {shown}")
    estimate = SECONDS_PER_PROCESS + n * SECONDS_PER_METHOD / state.workers
    if estimate > 60:
        state.log(f"  lowering takes about {estimate / 60:.1f} min on free cores ({SECONDS_PER_PROCESS:.0f} CPU s per "
                  f"process, then {SECONDS_PER_METHOD:.1f} per method; longer when the machine is busy); "
                  f"library messages go to {state.out / LOG_FILE}")
    state.report.update({
        "model_path": str(state.model_path.resolve()) if state.model_path else None,
        "methods": names,
        "max_batch": state.cfg.max_batch,
    })


def run_exporters(state: ExportState) -> None:
    job = state.job()
    for exporter in state.exporters:
        state.artifacts[exporter.name] = exporter.export(job)


def measure_size(state: ExportState) -> None:
    """The program against the all-task method alone: what storing each weight once saves."""
    from merging.cost import combination_cost
    from mobile_export.exporters.executorch import all_task_program

    program = state.program
    with state.phases.phase("measure_size", 1) as bar:
        single = all_task_program(state.job(), program)
        bar.update(1)
    net = state.net
    state.report["sizes"] = {
        "program_bytes": len(program),
        "all_task_only_bytes": len(single),
        "ratio": round(len(program) / len(single), 4),
        "parameters_bytes": 4 * sum(p.numel() for p in net.parameters()),
        # what the methods would weigh if each stored its own copy of the weights it reads
        "unshared_weights_bytes": 4 * sum(combination_cost(net, c).params for c in state.combos),
    }


def write_files(state: ExportState) -> None:
    """A fresh directory next to ``out`` with every produced file and the expected outputs."""
    state.tmp = Path(tempfile.mkdtemp(prefix=f".{state.out.name}.tmp-", dir=state.out.parent))
    os.chmod(state.tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be read by a service
    for artifact in state.artifacts.values():
        if artifact.data is not None:
            atomic_write_bytes(state.tmp / artifact.file, artifact.data)
    _write_expected_outputs(state)


def _write_expected_outputs(state: ExportState) -> None:
    """Sample inputs and eager outputs, so ``pam verify`` can check a bundle without the model."""
    x = example_input(state.net, state.cfg.max_batch, seed=state.cfg.seed + 1)
    outputs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for c in state.combos:
            outputs[combination_name(c)] = [o.detach().clone() for o in state.net.for_combination(c).eval()(x)]
    with tempfile.NamedTemporaryFile(dir=state.bundle, delete=False) as f:
        torch.save({"x": x, "outputs": outputs}, f)
    os.replace(f.name, state.bundle / EXPECTED_OUTPUTS_FILE)


def write_manifest(state: ExportState) -> None:
    """The manifest of what is in the bundle now (written again when a file is left out)."""
    from merging.checkpoint import sha256_file
    from merging.cost import combination_cost
    from mobile_export.model_meta import default_version, provenance_of

    net, cfg, ran = state.net, state.cfg, {e.name: e for e in state.exporters}
    formats: dict[str, Any] = {}
    for name in exporter_names():  # formats not run say so too (the lite status)
        formats.update((ran.get(name) or get_exporter(name)).manifest_fields(state.artifacts.get(name)))
    methods = []
    for c in state.combos:
        cost, name = combination_cost(net, c), combination_name(c)
        extra: dict[str, Any] = {}
        for e in state.exporters:
            extra.update(e.method_fields(state.artifacts[e.name], name))
        methods.append(MethodEntry(name=name, tasks=list(c), macs=cost.macs, params=cost.params, **extra))
    state.manifest = Manifest(
        model_name=cfg.model_name or (state.model_path.stem if state.model_path else "multitask"),
        model_version=cfg.model_version or default_version(net, state.model_path),
        **formats,
        tasks=[TaskEntry(name=t.name, kind=t.kind, labels=list(t.labels)) for t in net.tasks],
        input=InputSpec(shape=[net.arch.in_channels, *net.arch.input_size], dtype="float32", max_batch=cfg.max_batch),
        preprocessing=state.preprocessing,
        preprocessing_source=state.preprocessing_source,
        methods=methods,
        expected_outputs=EXPECTED_OUTPUTS_FILE,
        expected_outputs_sha256=sha256_file(state.bundle / EXPECTED_OUTPUTS_FILE),
        accuracy=state.accuracy,
        provenance=provenance_of(net, state.model_path),
    )
    state.manifest.save(state.bundle)


def verify_artifacts(state: ExportState) -> None:
    """Each written file against eager. A required format's failure fails the export; an optional
    one's file is removed and the manifest says why. Optional files are always checked (never
    shipped unchecked); the program unless ``verify=False``."""
    job = state.job()
    for exporter in state.exporters:
        artifact = state.artifacts[exporter.name]
        if not artifact.produced or (exporter.required and not state.cfg.verify):
            continue
        check = exporter.verify(artifact, state.bundle, job)
        state.checks[exporter.name] = check
        if exporter.name == PROGRAM_EXPORTER:
            state.report["verification"] = check.report
        if check.ok:
            continue
        if exporter.required:
            raise ExportError("verification_failed", check.problem or "verification failed")
        (state.bundle / artifact.file).unlink()
        state.artifacts[exporter.name] = artifact.dropped(check.problem or "verification failed")
        write_manifest(state)


def measure_memory(state: ExportState) -> None:
    from mobile_export.verify import measure_memory as probe_memory

    with state.phases.phase("measure_memory", 2) as bar:
        state.report["memory"] = probe_memory(state.bundle, on_child=lambda: bar.update(1))


def write_report(state: ExportState) -> None:
    cfg, report = state.cfg, state.report
    manifest = state.manifest
    assert manifest is not None
    report["lite_status"] = manifest.lite_status
    report["preprocessing_source"] = state.preprocessing_source
    report["accuracy"] = state.accuracy
    report["accuracy_source"] = f"test split of {cfg.accuracy_data}" if cfg.accuracy_data else "model meta"
    report["exporters"] = {
        name: {"file": a.file if a.produced else None, "status": a.status, "bytes": len(a.data or b""),
               **a.details,
               # the program's own check is report["verification"]; the other formats' are kept here
               **({"verification": state.checks[name].report}
                  if name in state.checks and name != PROGRAM_EXPORTER else {})}
        for name, a in state.artifacts.items()
    }
    report["phases"] = state.phases.as_dict()
    atomic_write_json(state.bundle / REPORT_FILE, report)


def publish(state: ExportState) -> None:
    """The library log into the bundle, files readable by a service, then the rename into place."""
    sys.stderr.flush()
    if state.log_path.exists():
        shutil.copyfile(state.log_path, state.bundle / LOG_FILE)
    for f in state.bundle.iterdir():
        os.chmod(f, 0o644)
    out, old = state.out, None
    if out.exists():
        if not state.cfg.force:
            raise ExportError("bundle_exists", f"{out} already exists (use --force to replace it)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")  # moved aside first, deleted after
        os.replace(out, old)
    os.replace(state.bundle, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    state.log_path.unlink(missing_ok=True)
