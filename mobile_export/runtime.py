"""Loading and running a bundle with the ExecuTorch runtime, safely.

Imports nothing from ``merging``: the service (like a phone) needs only this module, the
manifest schema and ExecuTorch.

Safety, as measured with executorch 1.5.1: random bytes handed to the loader abort the whole
process (its log of the bad magic breaks on non-UTF-8 bytes), and flipped weight bytes load
silently. So every file is checked (magic ``ET12`` at offset 4, the manifest's sha256) before the
loader sees it, and :func:`probe_bundle` loads a bundle in a child process so a crash there is a
report, not the caller's death.

Memory: XNNPACK keeps its own packed copy of the weights per *loaded method*, so
:class:`BundleRuntime` can load methods lazily and keep at most ``max_loaded`` of them (LRU).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mobile_export.errors import ExportError
from mobile_export.manifest import Manifest, MethodEntry

PTE_MAGIC = b"ET12"  # bytes 4..8 of every ExecuTorch 1.x program (flatbuffer file identifier)

# The XNNPACK threadpool can be resized only before any program is loaded (afterwards it
# crashed the process), so this module remembers whether it has loaded one.
_loaded_any_program = False
_state_lock = threading.Lock()


# ---------------------------------------------------------------------------- files
def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_bytes(data: bytes, where: str, expected_sha256: str | None) -> None:
    if len(data) < 8 or data[4:8] != PTE_MAGIC:
        raise ExportError("bad_program", f"{where} is not an ExecuTorch program (no {PTE_MAGIC.decode()} magic)")
    if expected_sha256 is not None and _sha256_bytes(data) != expected_sha256.lower():
        raise ExportError("sha256_mismatch", f"{where} does not match the sha256 in its manifest (corrupt or replaced)")


def _read_program(path: str | Path) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ExportError("missing_program", f"no program file at {p}")
    try:
        return p.read_bytes()
    except OSError as e:
        raise ExportError("bad_program", f"cannot read {p}: {e}") from e


def check_program(path: str | Path, expected_sha256: str | None) -> None:
    """Raise :class:`ExportError` unless ``path`` is an ExecuTorch program with that sha256.

    Call this before handing any file to the ExecuTorch loader.
    """
    _check_bytes(_read_program(path), str(path), expected_sha256)


def _load_verified(path: str | Path, expected_sha256: str | None) -> Any:
    """Read once, check the very bytes that get loaded (no window for the file to change)."""
    global _loaded_any_program
    data = _read_program(path)
    _check_bytes(data, str(path), expected_sha256)
    from executorch.runtime import Runtime

    with _state_lock:
        _loaded_any_program = True
    try:
        return Runtime.get().load_program(data)
    except RuntimeError as e:
        raise ExportError("bad_program", f"ExecuTorch refused {path}: {e}") from e


# ---------------------------------------------------------------------------- threads
def set_threads(n: int) -> None:
    """Size the XNNPACK threadpool; only before any program is loaded in this process."""
    if n < 1:
        raise ExportError("bad_threads", f"thread count must be >= 1, got {n}")
    with _state_lock:
        if _loaded_any_program and thread_count() != n:  # asking for what is already there is fine
            raise ExportError(
                "threads_after_load",
                "the XNNPACK threadpool can only be resized before any program is loaded in this process",
            )
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(n))


def thread_count() -> int:
    from executorch.extension.pybindings import portable_lib

    return int(portable_lib._threadpool_get_thread_count())


# ---------------------------------------------------------------------------- probe
@dataclass
class ProbeResult:
    ok: bool
    error: str | None
    methods: list[str] = field(default_factory=list)
    rss_mb: float | None = None


PROBE_MARK = "PAM-PROBE-RESULT "  # prefix of the child's one result line on stdout


def run_probe_child(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``python -m mobile_export.probe ARGS`` in a child process (this package importable there).

    Raises ``subprocess.TimeoutExpired``; a crash of the child is just a non-zero return code.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "mobile_export.probe", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, errors="replace")


def probe_bundle(bundle_dir: str | Path, timeout_s: float = 120.0) -> ProbeResult:
    """Load and run every method of a bundle in a child process; never crashes the caller.

    The child (``python -m mobile_export.probe DIR``) validates the manifest, checks the
    program, loads it, runs every method on zeros at batch 1 and compares output shapes with
    the manifest. A crash of the child (e.g. SIGABRT, exit 134) or a timeout is ``ok=False``.
    """
    try:
        proc = run_probe_child([str(bundle_dir)], timeout_s)
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"probe of {bundle_dir} timed out after {timeout_s:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_MARK):
            try:
                d = json.loads(line[len(PROBE_MARK) :])
                return ProbeResult(bool(d["ok"]), d.get("error"), list(d.get("methods") or []), d.get("rss_mb"))
            except (json.JSONDecodeError, KeyError, TypeError):
                break
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    if proc.returncode in (134, -6):
        how += " (abort inside the ExecuTorch loader)"
    return ProbeResult(False, f"probe of {bundle_dir} crashed ({how}): {tail or 'no output'}")


# ---------------------------------------------------------------------------- runtime
class BundleRuntime:
    """A bundle loaded into the ExecuTorch runtime, one method per combination.

    ``lazy=False`` loads every method now (at most ``max_loaded``); ``lazy=True`` loads a method
    on first use. With ``max_loaded`` set, the least recently used method is released when
    another must be loaded (each loaded XNNPACK method holds its own packed weights).
    Thread-safe: calls are serialised (ExecuTorch's ``execute`` holds the GIL anyway, and
    host-memory methods of one program share their activation arenas).
    """

    def __init__(self, bundle_dir: str | Path, *, lazy: bool = False, max_loaded: int | None = None) -> None:
        if max_loaded is not None and max_loaded < 1:
            raise ExportError("bad_max_loaded", f"max_loaded must be >= 1 or None, got {max_loaded}")
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = Manifest.load(self.bundle_dir)
        self.max_loaded = max_loaded
        self._program = _load_verified(self.bundle_dir / self.manifest.program, self.manifest.program_sha256)
        in_program = set(self._program.method_names)
        missing = [m.name for m in self.manifest.methods if m.name not in in_program]
        if missing:
            raise ExportError("bad_bundle", f"manifest methods missing from the program: {', '.join(missing)}")
        self._entries: dict[str, MethodEntry] = {m.name: m for m in self.manifest.methods}
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.RLock()
        if not lazy:
            self.warm()

    # ----------------------------------------------------------------- loading
    def _method(self, name: str) -> Any:
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            while self.max_loaded is not None and len(self._loaded) >= self.max_loaded:
                old, _ = self._loaded.popitem(last=False)
                # Program caches every loaded method and offers no release; clear its cache entry
                # so the method (and its packed XNNPACK weights) is freed with ours.
                self._program._methods[old] = None
            try:
                method = self._program.load_method(name)
            except RuntimeError as e:
                raise ExportError("bad_program", f"cannot load method {name}: {e}") from e
            self._loaded[name] = method
            return method

    def loaded_methods(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def warm(self) -> None:
        """Load every method now (only the first ``max_loaded`` when bounded)."""
        names = [m.name for m in self.manifest.methods]
        if self.max_loaded is not None:
            names = names[: self.max_loaded]
        for name in names:
            self._method(name)

    # ----------------------------------------------------------------- running
    def entry(self, method: str) -> MethodEntry:
        e = self._entries.get(method)
        if e is None:
            raise ExportError(
                "unknown_method", f"no method {method!r}; methods: {', '.join(self._entries)}"
            )
        return e

    def _check_input(self, x: Any) -> None:
        spec = self.manifest.input
        if not isinstance(x, torch.Tensor):
            raise ExportError("bad_input", f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise ExportError("bad_dtype", f"input dtype must be float32, got {x.dtype}")
        if x.dim() != 4 or list(x.shape[1:]) != list(spec.shape):
            raise ExportError(
                "bad_shape", f"input must have shape (B, {', '.join(map(str, spec.shape))}), got {tuple(x.shape)}"
            )
        b = int(x.shape[0])
        if b < 1:
            raise ExportError("bad_shape", "input batch is empty")
        if b > spec.max_batch:
            raise ExportError("batch_too_large", f"batch {b} exceeds the bundle's maximum batch {spec.max_batch}")

    def run(self, method: str, x: torch.Tensor) -> list[torch.Tensor]:
        """Run one method; returns one tensor per task of the method, in manifest order."""
        entry = self.entry(method)
        self._check_input(x)
        with self._lock:
            m = self._method(method)
            try:
                outs = m.execute([x.contiguous()])
            except RuntimeError as e:
                raise ExportError("execution_failed", f"method {method} failed: {e}") from e
            # Outputs may alias the method's buffers; own them before the next call.
            result = [o.clone() for o in outs]
        if len(result) != len(entry.tasks):
            raise ExportError(
                "bad_bundle", f"method {method} returned {len(result)} outputs, manifest lists {len(entry.tasks)}"
            )
        return result

    def run_tasks(self, tasks: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the method of a combination (any order, ``"a,b"`` or a list): task -> output."""
        entry = self.manifest.method_for(tasks)
        return dict(zip(entry.tasks, self.run(entry.name, x), strict=True))
