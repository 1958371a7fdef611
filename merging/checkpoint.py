"""Saving and loading networks: ``<stem>.json`` (structure, tasks, sha256) + ``<stem>.pt`` (weights).

Weights are loaded with ``weights_only=True`` (never unpickle code from a file) and checked
against the JSON's sha256 and the structure it describes; both files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from merging.errors import MergingError
from merging.network import MultitaskNet


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".pt") else p
    return stem.with_suffix(".json"), stem.with_suffix(".pt")


def save_model(net: MultitaskNet, path: str | Path) -> Path:
    """Write ``<path>.pt`` then ``<path>.json``; returns the JSON path (the one to pass around)."""
    cfg_path, pt_path = _paths(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{pt_path.name}.", dir=pt_path.parent if pt_path.parent.exists() else None)
    os.close(fd)
    try:
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, tmp)
        data = Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_bytes(pt_path, data)
    cfg = net.config()
    cfg["weights"] = {"file": pt_path.name, "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(cfg_path, cfg)
    return cfg_path


def load_model(path: str | Path) -> MultitaskNet:
    cfg_path, pt_path = _paths(path)
    if not cfg_path.is_file():
        raise MergingError("missing_checkpoint", f"no model config at {cfg_path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergingError("corrupt_checkpoint", f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise MergingError("corrupt_checkpoint", f"{cfg_path} does not hold a model config")
    weights = cfg.get("weights") or {}
    pt_path = cfg_path.parent / str(weights.get("file", pt_path.name))
    if not pt_path.is_file():
        raise MergingError("missing_checkpoint", f"no weights file at {pt_path}")
    expected = weights.get("sha256")
    if expected and sha256_file(pt_path) != expected:
        raise MergingError("corrupt_checkpoint", f"{pt_path} does not match the sha256 in {cfg_path.name}")
    net = MultitaskNet.from_config(cfg)
    try:
        state = torch.load(pt_path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise MergingError(
            "corrupt_checkpoint", f"{pt_path} is corrupt or not a weights-only checkpoint: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(state, dict):
        raise MergingError("corrupt_checkpoint", f"{pt_path} does not hold a state dict")
    own = net.state_dict()
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise MergingError(
            "corrupt_checkpoint", f"{pt_path} does not fit its config: missing {missing[:5]}, extra {extra[:5]}"
        )
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.shape != own[k].shape:
            raise MergingError("corrupt_checkpoint", f"{pt_path}: tensor {k} has the wrong shape")
    net.load_state_dict(state)
    net.eval()
    return net
