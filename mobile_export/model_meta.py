"""What the manifest says about the model besides its methods: preprocessing, accuracy, provenance
and version, from the model's meta, a file or a built-in data set."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from merging.checkpoint import sha256_file
from merging.errors import MergingError
from mobile_export.errors import ExportError
from mobile_export.manifest import Preprocessing, Provenance

if TYPE_CHECKING:
    from merging.network import MultitaskNet


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


def default_version(net: MultitaskNet, model_path: Path | None) -> str:
    if model_path is not None:
        w = (json.loads(model_path.read_text()).get("weights") or {}).get("sha256")
        if w:
            return "w" + str(w)[:12]
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return "w" + h.hexdigest()[:12]
