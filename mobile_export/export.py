"""Export a multitask network to a bundle: one ExecuTorch program with a method per combination.

Each combination's :class:`~merging.network.CombinationModule` holds the network's own block
modules, so all methods read the same parameter tensors; lowering them together in one
``to_edge_transform_and_lower({name: program})`` call lets ExecuTorch store each weight once.

The bundle is built in a temporary directory next to the destination, verified there with the
real ExecuTorch runtime, and only then renamed into place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
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

MAX_AUTO_TASKS = 6  # above this many tasks (63 methods) the caller must choose --combinations
DEFAULT_MAX_BATCH = 8


@dataclass(frozen=True)
class ExportConfig:
    combinations: Sequence[str | Sequence[str]] | None = None  # None: every combination (<= MAX_AUTO_TASKS tasks)
    max_batch: int = DEFAULT_MAX_BATCH  # largest batch every method accepts (dynamic batch dimension)
    lite: bool = True  # also write model.ptl for the TorchScript lite interpreter
    verify: bool = True  # run every method through the ExecuTorch runtime against eager before publishing
    measure: bool = True  # also lower an all-task-only program, to report the size the extra methods cost
    memory: bool = True  # measure RSS of loading one method vs all, in child processes
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
    for key, block in net.blocks.items():
        conv: nn.Conv2d = block.conv  # type: ignore[assignment]
        if conv.in_channels == 0 or conv.out_channels == 0:
            raise ExportError(
                "zero_width", f"block {key} has a zero-width convolution {tuple(conv.weight.shape)}; "
                "remove empty groups with select_channels(layer, set, []) before export",
            )
    for task, head in net.heads.items():
        if head.conv.in_channels == 0:  # type: ignore[union-attr]
            raise ExportError("zero_width", f"head {task} reads no channel")


# ---------------------------------------------------------------------------- lowering
def example_input(net: MultitaskNet, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = net.arch.input_size
    return torch.randn(batch, net.arch.in_channels, h, w, generator=g)


def export_programs(net: MultitaskNet, combos: Sequence[tuple[str, ...]], max_batch: int) -> dict[str, Any]:
    """``torch.export`` one program per combination, batch dimension dynamic up to ``max_batch``."""
    from torch.export import Dim, export

    net.eval()
    # Trace with batch 2 (a batch of 1 would be specialised), unless only batch 1 is allowed.
    x = example_input(net, min(2, max_batch))
    dyn = {"x": {0: Dim("batch", min=1, max=max_batch)}} if max_batch > 1 else None
    programs: dict[str, Any] = {}
    for combo in combos:
        module = net.for_combination(combo).eval()
        programs["+".join(combo)] = export(module, (x,), dynamic_shapes=dyn, strict=False)
    return programs


def lower_programs(programs: Mapping[str, Any]) -> bytes:
    """One XNNPACK-lowered ExecuTorch program holding every method (weights stored once)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(dict(programs), partitioner=[XnnpackPartitioner()])
    return bytes(edge.to_executorch().buffer)


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
        out["+".join(combo)] = name
    return out


def build_lite(
    net: MultitaskNet, combos: Sequence[tuple[str, ...]], max_batch: int
) -> tuple[bytes | None, str, dict[str, str]]:
    """A lite-interpreter program with one traced method per combination, kept only if it loads
    back and matches eager at batch 1 and ``max_batch``. Returns (bytes or None, status, names)."""
    names = lite_method_names(combos)
    subs = {names["+".join(c)]: net.for_combination(c).eval() for c in combos}

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
            traced = torch.jit.trace_module(wrapper, {k: (x,) for k in subs})
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
    """Write a verified bundle for ``model`` (a network, or a path saved by ``save_model``)."""
    from mobile_export.verify import measure_memory, verify_bundle

    cfg = cfg or ExportConfig()
    if cfg.max_batch < 1:
        raise ExportError("bad_max_batch", f"max batch must be >= 1, got {cfg.max_batch}")
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

    log(f"exporting {len(combos)} method(s): {', '.join('+'.join(c) for c in combos)}")
    try:
        program = lower_programs(export_programs(net, combos, cfg.max_batch))
    except Exception as e:  # torch.export / ExecuTorch raise many types; the user needs one clear error
        raise ExportError("lowering_failed", f"torch.export/XNNPACK lowering failed: {type(e).__name__}: {e}") from e
    report: dict[str, Any] = {
        "model_path": str(model_path.resolve()) if model_path else None,
        "methods": ["+".join(c) for c in combos],
        "max_batch": cfg.max_batch,
    }
    full = tuple(sorted(net.task_names))
    if cfg.measure:
        single = program if combos == [full] else lower_programs(export_programs(net, [full], cfg.max_batch))
        report["sizes"] = {
            "program_bytes": len(program),
            "all_task_only_bytes": len(single),
            "ratio": round(len(program) / len(single), 4),
            "parameters_bytes": 4 * sum(p.numel() for p in net.parameters()),
            # what the methods would weigh if each stored its own copy of the weights it reads
            "unshared_weights_bytes": 4 * sum(combination_cost(net, c).params for c in combos),
        }

    lite_bytes, lite_status, lite_names = (
        build_lite(net, combos, cfg.max_batch) if cfg.lite else (None, "not requested", {})
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be read by a service
    try:
        atomic_write_bytes(tmp / PROGRAM_FILE, program)
        if lite_bytes is not None:
            atomic_write_bytes(tmp / LITE_FILE, lite_bytes)
        methods = []
        for c in combos:
            cost = combination_cost(net, c)
            name = "+".join(c)
            methods.append(
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
            methods=methods,
            accuracy=accuracy,
            provenance=provenance_of(net, model_path),
        )
        _write_reference(tmp, net, combos, cfg)
        manifest = manifest.model_copy(
            update={"reference": REFERENCE_FILE, "reference_sha256": sha256_file(tmp / REFERENCE_FILE)}
        )
        manifest.save(tmp)
        if cfg.verify:
            v = verify_bundle(tmp, net=net, seed=cfg.seed, strict=False)
            report["verification"] = v
            if not v["ok"]:
                raise ExportError("verification_failed", f"bundle does not match eager: {v['failures']}")
        if cfg.memory:
            report["memory"] = measure_memory(tmp)
        report["lite_status"] = lite_status
        report["preprocessing_source"] = pre_origin
        report["accuracy"] = accuracy
        report["accuracy_source"] = f"test split of {cfg.accuracy_data}" if cfg.accuracy_data else "model meta"
        atomic_write_json(tmp / REPORT_FILE, report)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        _publish(tmp, out, cfg.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
            outputs["+".join(c)] = [o.detach().clone() for o in net.for_combination(c).eval()(x)]
    path = bundle / REFERENCE_FILE
    with tempfile.NamedTemporaryFile(dir=bundle, delete=False) as f:
        torch.save({"x": x, "outputs": outputs}, f)
    os.replace(f.name, path)
