"""Export a multitask network to a bundle: one ExecuTorch program with a method per combination.

Each combination's :class:`~merging.network.CombinationModule` holds the network's own block
modules, so all methods read the same parameter tensors; lowering them together in one
``to_edge_transform_and_lower({name: program})`` call lets ExecuTorch store each weight once.

The bundle is built in a temporary directory next to the destination, verified there with the
real ExecuTorch runtime, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merging.checkpoint import atomic_write_bytes, atomic_write_json, load_model, sha256_file
from merging.cost import combination_cost
from merging.errors import MergingError
from merging.network import MultitaskNet
from mobile_export.errors import ExportError
from mobile_export.lowering import example_input, export_method, lower_serial
from mobile_export.manifest import (
    LITE_FILE,
    PROGRAM_FILE,
    REFERENCE_FILE,
    REPORT_FILE,
    InputSpec,
    Manifest,
    MethodEntry,
    Preprocessing,
    Provenance,
    TaskEntry,
)
from mobile_export.quiet import quiet_stderr
from pam_common.combinations import combination_name

MAX_AUTO_TASKS = 6  # above this many tasks (63 methods) the caller must choose --combinations
DEFAULT_MAX_BATCH = 8
LOG_FILE = "export.log"  # in the bundle: what the libraries printed during the export
# CPU seconds to export, lower and emit one method of the demo's LeNet (measured: 9-11 s,
# results/export-phases-*.md), for the estimate printed before a long export.
SECONDS_PER_METHOD = 10.0
MIN_METHODS_PER_WORKER = 6  # below this many methods per process, a worker's start-up is not worth it
LITE_OFF = "not produced: off by default (TorchScript lite is deprecated upstream); pam export --lite writes it"


@dataclass(frozen=True)
class ExportConfig:
    combinations: Sequence[str | Sequence[str]] | None = None  # None: every combination (<= MAX_AUTO_TASKS tasks)
    max_batch: int = DEFAULT_MAX_BATCH  # largest batch every method accepts (dynamic batch dimension)
    lite: bool = False  # also write model.ptl for the TorchScript lite interpreter (deprecated upstream)
    verify: bool = True  # run every method through the ExecuTorch runtime against eager before publishing
    measure: bool = False  # also lower an all-task-only program, to report the size the extra methods cost
    memory: bool = False  # measure RSS of loading one method vs all, in child processes
    workers: int | None = None  # processes lowering side by side (None: one per core, >= 6 methods each); same bytes
    progress: bool | None = None  # progress bars on the terminal (None: only when stderr is a terminal)
    quiet: bool = True  # library noise (torchao, cpuinfo, warnings) to export.log in the bundle, not the terminal
    preprocessing: str | None = None  # source when the model's meta has none (dataset name or JSON file)
    model_name: str | None = None  # default: the model file's stem
    model_version: str | None = None  # default: "w" + first 12 hex digits of the weights' sha256
    force: bool = False  # replace an existing bundle directory
    seed: int = 0  # of the verification inputs
    accuracy_data: str | None = None  # data set whose test split measures accuracy (else the model's meta)


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: Manifest
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- combinations
def resolve_combinations(net: MultitaskNet, requested: Iterable[str | Sequence[str]] | None) -> list[tuple[str, ...]]:
    """Canonical, de-duplicated combinations, in request order (all of them when ``None``)."""
    from merging.tasks import all_combinations, canonical_combination

    names = net.task_names
    if requested is None:
        if len(names) > MAX_AUTO_TASKS:
            raise ExportError(
                "too_many_combinations",
                f"{len(names)} tasks make {2 ** len(names) - 1} combinations; choose the ones to export "
                f"with --combinations (all are exported automatically up to {MAX_AUTO_TASKS} tasks)",
            )
        return all_combinations(names)
    out: list[tuple[str, ...]] = []
    for c in requested:
        try:
            combo = canonical_combination(c, names)
        except MergingError as e:
            raise ExportError(e.code, f"combination {c!r}: {e.message}") from e
        if combo not in out:
            out.append(combo)
    if not out:
        raise ExportError("empty_combination_list", "no combination to export (the list is empty)")
    return out


def parse_combinations(text: str) -> list[str]:
    """``"digit;digit+parity"`` or ``"digit,digit+parity"``: combinations separated by ';' or ',',
    tasks within one joined by '+'."""
    return [p.strip() for p in re.split(r"[;,]", text) if p.strip()]


def check_exportable(net: MultitaskNet) -> None:
    """Zero-width convolutions cannot be lowered; the network must have removed such groups."""
    net.check_wiring()
    for node in net.graph():
        if node.kind == "add" or node.kind == "head":
            continue  # an addition has no conv; heads are checked below
        key, conv = node.key.name, net.conv_of(node.key)
        if conv.in_channels == 0 or conv.out_channels == 0:
            raise ExportError(
                "zero_width", f"block {key} has a zero-width convolution {tuple(conv.weight.shape)}; "
                "remove empty groups with select_channels(layer, set, []) before export",
            )
    for task, head in net.heads.items():
        if head.conv.in_channels == 0:  # type: ignore[union-attr]
            raise ExportError("zero_width", f"head {task} reads no channel")


# ---------------------------------------------------------------------------- lowering
def export_programs(net: MultitaskNet, combos: Sequence[tuple[str, ...]], max_batch: int) -> dict[str, Any]:
    """``torch.export`` one program per combination, batch dimension dynamic up to ``max_batch``."""
    return {combination_name(c): export_method(net, c, max_batch) for c in combos}


def lower_programs(programs: Mapping[str, Any]) -> bytes:
    """One XNNPACK-lowered ExecuTorch program holding every method (weights stored once), in one
    ExecuTorch call (the reference :func:`mobile_export.lowering.lower_methods` is checked against)."""
    return lower_serial(dict(programs), check_ir=False)


# ---------------------------------------------------------------------------- lite interpreter
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


def build_lite(
    net: MultitaskNet, combos: Sequence[tuple[str, ...]], max_batch: int, on_method: Any = None,
    check_trace: bool = False,
) -> tuple[bytes | None, str, dict[str, str]]:
    """A lite-interpreter program with one traced method per combination, kept only if it loads
    back and matches eager at batch 1 and ``max_batch``. Returns (bytes or None, status, names).

    Each method is traced once: the tracer's own check (``check_trace=True``, what this did before)
    traces every method a second time and compares, which the reload-and-compare below covers."""
    names = lite_method_names(combos)
    subs = {names[combination_name(c)]: net.for_combination(c).eval() for c in combos}

    def _make(key: str) -> Any:
        def method(self: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.subs[key](x)  # type: ignore[index,no-any-return,operator]

        return method

    cls = type("LiteBundle", (nn.Module,), {k: _make(k) for k in subs})
    wrapper = cls()
    wrapper.subs = nn.ModuleDict(subs)
    x = example_input(net, min(2, max_batch))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace_module(wrapper, {k: (x,) for k in subs}, check_trace=check_trace)
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / LITE_FILE
                traced._save_for_lite_interpreter(str(path))
                data = path.read_bytes()
                from torch.jit.mobile import _load_for_lite_interpreter

                loaded = _load_for_lite_interpreter(str(path))
                for b in sorted({1, max_batch}):
                    xb = example_input(net, b, seed=1)
                    for k, sub in subs.items():
                        got = loaded.run_method(k, xb)
                        want = sub(xb)
                        got = got if isinstance(got, tuple) else (got,)
                        same = len(got) == len(want) and all(
                            g.shape == w.shape and float((g - w).abs().max()) <= 1e-4
                            for g, w in zip(got, want, strict=False)
                        )
                        if not same:
                            return None, f"not produced: lite method {k} differs from eager at batch {b}", {}
                        if on_method is not None and b == max_batch:
                            on_method(k)
    except Exception as e:  # TorchScript's tracer/lite saver raise many types; any means "no .ptl"
        why = f"{type(e).__name__}: {e}"
        return None, f"not produced: torch {torch.__version__} failed to build or reload it ({why})", {}
    return data, f"ok: traced with torch {torch.__version__}, reloaded by the lite interpreter and matched eager", names


# ---------------------------------------------------------------------------- manifest parts
def _preprocessing_from_json(d: Mapping[str, Any]) -> Preprocessing:
    size = [int(v) for v in d["size"]]
    channels = int(d.get("channels", len(d.get("mean", [0]))))
    return Preprocessing(
        size=size,
        channel_order="L" if channels == 1 else "RGB",
        invert=bool(d.get("invert", False)),
        mean=[float(v) for v in d["mean"]],
        std=[float(v) for v in d["std"]],
    )


def resolve_preprocessing(net: MultitaskNet, source: str | None) -> tuple[Preprocessing, str]:
    """(preprocessing, where it came from): ``source`` if given (a data set name, a model JSON, a
    manifest, or a plain preprocessing JSON), else the model's meta, else the digits defaults."""
    found: Preprocessing | None = None
    origin = ""
    meta_pre = net.meta.get("preprocessing")
    try:
        if source is not None:
            p = Path(source)
            if p.is_file():
                d = json.loads(p.read_text())
                d = d.get("meta", {}).get("preprocessing") or d.get("preprocessing") or d
                found = Preprocessing(**d) if "channel_order" in d else _preprocessing_from_json(d)
                origin = f"file {p.name}"
            else:
                from merging.data import load_dataset

                found = _preprocessing_from_json(load_dataset(source).preprocessing.to_json())
                origin = f"data set {source}"
        elif isinstance(meta_pre, dict):
            found, origin = _preprocessing_from_json(meta_pre), "model meta"
    except MergingError as e:
        raise ExportError("bad_preprocessing", f"preprocessing source {source!r}: {e.message}") from e
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError("bad_preprocessing", f"cannot read preprocessing from {source!r}: {e}") from e
    if found is None:
        from merging.data.digits import DIGITS_PREPROCESSING

        c = net.arch.in_channels
        d = DIGITS_PREPROCESSING.to_json()
        found = Preprocessing(
            size=list(net.arch.input_size),
            channel_order="L" if c == 1 else "RGB",
            mean=list(d["mean"]) * c,
            std=list(d["std"]) * c,
            invert=bool(d["invert"]),
        )
        origin = "default (digits mean/std; the model has no preprocessing and none was given)"
    if list(found.size) != list(net.arch.input_size) or len(found.mean) != net.arch.in_channels:
        raise ExportError(
            "bad_preprocessing",
            f"preprocessing from {origin} ({found.size}, {len(found.mean)} channels) does not fit the network's "
            f"input {list(net.arch.input_size)} with {net.arch.in_channels} channels",
        )
    return found, origin


def accuracy_of(net: MultitaskNet) -> dict[str, float]:
    """Per-task test accuracy if the model's meta records it (merged, pruned or single-task forms)."""
    meta = net.meta
    for key in ("test_accuracy", "accuracy"):
        v = meta.get(key)
        if isinstance(v, dict):
            return {t: float(a) for t, a in v.items() if t in net.task_names and isinstance(a, int | float)}
        if isinstance(v, int | float) and len(net.task_names) == 1:
            return {net.task_names[0]: float(v)}
    return {}


def measure_accuracy(net: MultitaskNet, dataset: str) -> dict[str, float]:
    """Eager test accuracy per task on a built-in data set's test split (same split as training)."""
    from merging.data import load_dataset
    from merging.train import evaluate

    try:
        splits = load_dataset(dataset, tasks=net.task_names) if dataset == "digits" else load_dataset(dataset)
        test = splits.test.select_tasks(net.task_names)
    except MergingError as e:
        raise ExportError("bad_accuracy_data", f"accuracy data {dataset!r}: {e.message}") from e
    except (KeyError, TypeError) as e:
        raise ExportError("bad_accuracy_data", f"data set {dataset!r} lacks the model's tasks {net.task_names}") from e
    want = (net.arch.in_channels, *net.arch.input_size)
    if tuple(test.x.shape[1:]) != want:
        raise ExportError("bad_accuracy_data", f"data set {dataset!r} has inputs {tuple(test.x.shape[1:])}, not {want}")
    with torch.no_grad():
        return {t: round(a, 3) for t, a in evaluate(net, test).items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for pkg in ("pam-mobile", "torch", "executorch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def provenance_of(net: MultitaskNet, model_path: Path | None) -> Provenance:
    sources: dict[str, str] = {}
    if isinstance(net.meta.get("sources"), dict):
        sources.update({str(k): str(v) for k, v in net.meta["sources"].items()})
    if model_path is not None:
        cfg = json.loads(model_path.read_text())
        w = (cfg.get("weights") or {}).get("sha256")
        sources[model_path.name] = sha256_file(model_path)
        if w:
            sources[str((cfg.get("weights") or {}).get("file"))] = str(w)
    pruner = net.meta.get("pruner")
    for key in ("pruned", "prune"):  # the pruner records {"config": {"criterion": ...}, ...}
        rec = net.meta.get(key)
        if pruner is None and isinstance(rec, dict):
            inner = rec.get("config")
            conf: dict[str, Any] = inner if isinstance(inner, dict) else rec
            crit = conf.get("criterion") or conf.get("pruner")
            pruner = f"{crit} (budget {conf['budget']} points)" if crit and "budget" in conf else crit
    return Provenance(
        merger=net.meta.get("merger") or net.meta.get("kind"),
        pruner=None if pruner is None else str(pruner),
        sources=sources,
        packages=_versions(),
        created=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


# ---------------------------------------------------------------------------- bundle
def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished bundle into place; an old bundle is moved aside first, then deleted."""
    old: Path | None = None
    if out.exists():
        if not force:
            raise ExportError("bundle_exists", f"{out} already exists (use --force to replace it)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(
    model: MultitaskNet | str | Path, out: str | Path, cfg: ExportConfig | None = None, log: Any = print
) -> ExportResult:
    """Write a verified bundle for ``model`` (a network, or a path saved by ``save_model``).

    Library noise goes to ``export.log`` in the bundle (next to ``--out`` while the export runs,
    kept there if it fails); ``report.json`` records the time, CPU and peak RSS of every phase."""
    cfg = cfg or ExportConfig()
    if cfg.max_batch < 1:
        raise ExportError("bad_max_batch", f"max batch must be >= 1, got {cfg.max_batch}")
    if cfg.workers is not None and cfg.workers < 1:
        raise ExportError("bad_workers", f"workers must be >= 1, got {cfg.workers}")
    model_path: Path | None = None
    if isinstance(model, str | Path):
        model_path = Path(model)
        if model_path.suffix not in (".json", ".pt"):
            model_path = model_path.with_suffix(".json")
        try:
            net = load_model(model_path)
        except MergingError as e:
            raise ExportError(e.code, e.message) from e
        model_path = model_path.with_suffix(".json")
    else:
        net = model
    net.eval()
    out = Path(out)
    if out.exists() and not cfg.force:
        raise ExportError("bundle_exists", f"{out} already exists (use --force to replace it)")
    check_exportable(net)
    combos = resolve_combinations(net, cfg.combinations)
    preprocessing, pre_origin = resolve_preprocessing(net, cfg.preprocessing)
    accuracy = measure_accuracy(net, cfg.accuracy_data) if cfg.accuracy_data else accuracy_of(net)
    if not pre_origin.startswith(("model", "file", "data set")):
        log(f"note: preprocessing: {pre_origin}")

    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.parent / f".{out.name}.{LOG_FILE}"
    log_path.unlink(missing_ok=True)
    quiet = quiet_stderr(log_path) if cfg.quiet else contextlib.nullcontext(sys.stderr)
    try:
        with quiet as terminal:
            result = _export(net, model_path, out, combos, preprocessing, pre_origin, accuracy, cfg, log, terminal,
                             log_path)
    except BaseException:
        if log_path.exists() and log_path.stat().st_size:
            log(f"export failed; library messages are in {log_path}")
        else:
            log_path.unlink(missing_ok=True)
        raise
    return result


def _export(
    net: MultitaskNet, model_path: Path | None, out: Path, combos: list[tuple[str, ...]], preprocessing: Preprocessing,
    pre_origin: str, accuracy: dict[str, float], cfg: ExportConfig, log: Any, terminal: Any, log_path: Path,
) -> ExportResult:
    from mobile_export.lowering import default_workers, lower_methods, merge_methods
    from mobile_export.phases import Phases
    from mobile_export.verify import measure_memory, verify_bundle

    phases = Phases(terminal, cfg.progress)
    # A worker process costs ~20 CPU s (imports, warm-up), about two methods: by default one
    # process per core, but only with at least MIN_METHODS_PER_WORKER methods each.
    auto = max(1, min(default_workers(), len(combos) // MIN_METHODS_PER_WORKER))
    workers = min(cfg.workers or auto, len(combos))
    names = [combination_name(c) for c in combos]
    log(f"exporting {len(combos)} method(s) with {workers} process(es): "
        f"{', '.join(names) if len(names) <= 8 else ', '.join(names[:7]) + f', ... ({len(names) - 7} more)'}")
    estimate = len(combos) * SECONDS_PER_METHOD / workers
    if estimate > 20:
        log(f"  lowering takes about {estimate / 60:.1f} min on free cores ({SECONDS_PER_METHOD:.0f} CPU s per method; "
            "longer when the machine is busy); library messages go to " + str(out / LOG_FILE))
    log_file = open(log_path, "a")
    try:
        with phases.phase("lower", len(combos)) as bar:
            def done(m: Any) -> None:
                bar.update(1)
                bar.set_postfix_str(m.name, refresh=False)

            methods = lower_methods(net, combos, cfg.max_batch, workers=workers, on_done=done, log_file=log_file)
    except Exception as e:  # torch.export / ExecuTorch raise many types; the user needs one clear error
        raise ExportError("lowering_failed", f"torch.export/XNNPACK lowering failed: {type(e).__name__}: {e}") from e
    finally:
        log_file.close()
    phases.add_detail("lower", {
        "torch_export_s": round(sum(m.export_s for m in methods), 3),
        "to_edge_transform_and_lower_s": round(sum(m.lower_s for m in methods), 3),
        "to_executorch_s": round(sum(m.emit_s for m in methods), 3),
        "workers": workers,
        "note": "per-method sums of wall time over all processes; with workers > 1 they exceed the phase's wall time",
    })
    with phases.phase("serialize", 1) as bar:
        program = merge_methods(methods)
        bar.update(1)
    report: dict[str, Any] = {
        "model_path": str(model_path.resolve()) if model_path else None,
        "methods": names,
        "max_batch": cfg.max_batch,
    }
    full = tuple(sorted(net.task_names))
    if cfg.measure:
        with phases.phase("measure_size", 1) as bar:
            single = program if combos == [full] else merge_methods(lower_methods(net, [full], cfg.max_batch))
            bar.update(1)
        report["sizes"] = {
            "program_bytes": len(program),
            "all_task_only_bytes": len(single),
            "ratio": round(len(program) / len(single), 4),
            "parameters_bytes": 4 * sum(p.numel() for p in net.parameters()),
            # what the methods would weigh if each stored its own copy of the weights it reads
            "unshared_weights_bytes": 4 * sum(combination_cost(net, c).params for c in combos),
        }
    lite_names: dict[str, str] = {}
    lite_bytes, lite_status = None, LITE_OFF
    if cfg.lite:
        with phases.phase("lite", len(combos)) as bar:
            lite_bytes, lite_status, lite_names = build_lite(
                net, combos, cfg.max_batch, on_method=lambda k: bar.update(1))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be read by a service
    try:
        atomic_write_bytes(tmp / PROGRAM_FILE, program)
        if lite_bytes is not None:
            atomic_write_bytes(tmp / LITE_FILE, lite_bytes)
        methods_entries = []
        for c in combos:
            cost = combination_cost(net, c)
            name = combination_name(c)
            methods_entries.append(
                MethodEntry(
                    name=name, tasks=list(c), macs=cost.macs, params=cost.params, lite_method=lite_names.get(name)
                )
            )
        manifest = Manifest(
            model_name=cfg.model_name or (model_path.stem if model_path else "multitask"),
            model_version=cfg.model_version or _default_version(net, model_path),
            program_sha256=hashlib.sha256(program).hexdigest(),
            lite_program=LITE_FILE if lite_bytes is not None else None,
            lite_status=lite_status,
            tasks=[TaskEntry(name=t.name, kind=t.kind, labels=list(t.labels)) for t in net.tasks],
            input=InputSpec(
                shape=[net.arch.in_channels, *net.arch.input_size], dtype="float32", max_batch=cfg.max_batch
            ),
            preprocessing=preprocessing,
            preprocessing_source=pre_origin,
            methods=methods_entries,
            accuracy=accuracy,
            provenance=provenance_of(net, model_path),
        )
        _write_reference(tmp, net, combos, cfg)
        manifest = manifest.model_copy(
            update={"reference": REFERENCE_FILE, "reference_sha256": sha256_file(tmp / REFERENCE_FILE)}
        )
        manifest.save(tmp)
        if cfg.verify:
            with phases.phase("verify", len(combos)) as bar:
                v = verify_bundle(tmp, net=net, seed=cfg.seed, strict=False, on_method=lambda _: bar.update(1))
            report["verification"] = v
            if not v["ok"]:
                raise ExportError("verification_failed", f"bundle does not match eager: {v['failures']}")
        if cfg.memory:
            with phases.phase("measure_memory", 2) as bar:
                report["memory"] = measure_memory(tmp, on_child=lambda: bar.update(1))
        report["lite_status"] = lite_status
        report["preprocessing_source"] = pre_origin
        report["accuracy"] = accuracy
        report["accuracy_source"] = f"test split of {cfg.accuracy_data}" if cfg.accuracy_data else "model meta"
        report["phases"] = phases.as_dict()
        atomic_write_json(tmp / REPORT_FILE, report)
        sys.stderr.flush()
        if log_path.exists():
            shutil.copyfile(log_path, tmp / LOG_FILE)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        _publish(tmp, out, cfg.force)
        log_path.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  {phases.summary()}")
    return ExportResult(out, manifest, report)


def _default_version(net: MultitaskNet, model_path: Path | None) -> str:
    if model_path is not None:
        w = (json.loads(model_path.read_text()).get("weights") or {}).get("sha256")
        if w:
            return "w" + str(w)[:12]
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return "w" + h.hexdigest()[:12]


def _write_reference(bundle: Path, net: MultitaskNet, combos: Sequence[tuple[str, ...]], cfg: ExportConfig) -> None:
    """Sample inputs and eager outputs, so ``pam verify`` can check a bundle without the model."""
    x = example_input(net, cfg.max_batch, seed=cfg.seed + 1)
    outputs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for c in combos:
            outputs[combination_name(c)] = [o.detach().clone() for o in net.for_combination(c).eval()(x)]
    path = bundle / REFERENCE_FILE
    with tempfile.NamedTemporaryFile(dir=bundle, delete=False) as f:
        torch.save({"x": x, "outputs": outputs}, f)
    os.replace(f.name, path)
