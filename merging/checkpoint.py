"""Saving and loading networks: ``<stem>.json`` (structure, tasks, sha256) + ``<stem>.pt`` (weights).

Weights are loaded with ``weights_only=True`` (never unpickle code from a file) and checked
against the JSON's sha256 and the structure it describes; both files are written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from merging.errors import MergingError
from merging.network import MultitaskNet
from pam_common.atomic import atomic_write_bytes, atomic_write_json

# atomic_write_* are re-exported: the merging layer and pam_app import them from here.
__all__ = ["atomic_write_bytes", "atomic_write_json", "load_model", "save_model", "sha256_file"]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".pt") else p
    return stem.with_suffix(".json"), stem.with_suffix(".pt")


def save_model(net: MultitaskNet, path: str | Path) -> Path:
    """Write ``<path>.pt`` then ``<path>.json``; returns the JSON path (the one to pass around)."""
    cfg_path, pt_path = _paths(path)
    buf = io.BytesIO()  # serialise in memory: the sha256 below is of exactly the bytes written
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, buf)
    data = buf.getvalue()
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
