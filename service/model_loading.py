"""A bundle from disk to a :class:`LoadedModel` the runtime pool serves: the guard's checks (regular
files, size caps, the manifest signature), the program's magic and sha256, the optional crash-safe
probe in a child process, the load, and the per-method execute costs measured at load."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobile_export.errors import ExportError
from mobile_export.manifest import Manifest
from service.core.config import Settings

if TYPE_CHECKING:
    from service.bundle_guard import VerifiedManifest


@dataclass
class LoadedModel:
    """One bundle, loaded: what a request needs, swapped as a whole on reload."""

    bundle_dir: Path
    manifest: Manifest
    runtime: Any  # mobile_export.runtime.BundleRuntime
    loaded_at: float = field(default_factory=time.time)
    # measured at load (``calibrate``): seconds of one execute per method, (at 1 row, per extra row)
    costs: dict[str, tuple[float, float]] = field(default_factory=dict)
    tasks_of: dict[str, list[str]] = field(default_factory=dict)  # method -> its tasks, output order

    entries: dict[str, Any] = field(default_factory=dict)  # method -> MethodEntry
    task_info: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # task -> (kind, labels)

    def __post_init__(self) -> None:
        self.tasks_of = {m.name: list(m.tasks) for m in self.manifest.methods}
        self.entries = {m.name: m for m in self.manifest.methods}
        self.task_info = {t.name: (t.kind, list(t.labels)) for t in self.manifest.tasks}

    def cost(self, method: str, rows: int) -> float | None:
        c = self.costs.get(method)
        return None if c is None else c[0] + c[1] * max(0, rows - 1)


def calibrate(model: LoadedModel, repeats: int = 3) -> None:
    """Time every loaded method at 1 row and at 2 rows (best of ``repeats``): the executor choice
    (``auto``) and the union batching decision read these figures."""
    import torch

    spec = model.manifest.input
    x1 = torch.zeros((1, *spec.shape), dtype=torch.float32)
    x2 = torch.zeros((min(2, spec.max_batch), *spec.shape), dtype=torch.float32)
    for name in model.runtime.loaded_methods():
        t = []
        for x in (x1, x2):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                model.runtime.run(name, x)
                best = min(best, time.perf_counter() - t0)
            t.append(best)
        per_row = max(0.0, t[1] - t[0]) / max(1, int(x2.shape[0]) - 1) if x2.shape[0] > 1 else t[0]
        model.costs[name] = (t[0], per_row)


def public_key(settings: Settings) -> Any | None:
    """The configured Ed25519 key (``PAM_MANIFEST_PUBLIC_KEY``), or None when manifests are not signed."""
    if not settings.manifest_public_key:
        return None
    from service.bundle_guard import load_public_key

    try:
        return load_public_key(settings.manifest_public_key)
    except ValueError as e:
        raise ExportError("bad_public_key", f"PAM_MANIFEST_PUBLIC_KEY: {e}") from e


def check_files(bundle_dir: Path, settings: Settings) -> VerifiedManifest:
    """The guard's checks (regular files, size caps, the signature when a key is set) and the manifest."""
    from service.bundle_guard import verify_manifest

    return verify_manifest(
        bundle_dir,
        max_manifest_bytes=settings.max_manifest_bytes,
        max_program_bytes=settings.max_program_bytes,
        public_key=public_key(settings),
    )


def check_bundle(bundle_dir: Path, settings: Settings) -> Manifest:
    """Files (guard + signature), manifest schema, program magic + sha256, and (optionally) a crash-safe
    child-process probe."""
    from mobile_export.runtime import check_program, probe_bundle

    manifest = check_files(bundle_dir, settings).manifest
    check_program(bundle_dir / manifest.program, manifest.program_sha256)
    if settings.probe:
        result = probe_bundle(bundle_dir, timeout_s=settings.probe_timeout_s)
        if not result.ok:
            raise ExportError("probe_failed", result.error or f"probe of {bundle_dir} failed")
    return manifest


def load_bundle(bundle_dir: Path, settings: Settings, *, probe: bool) -> LoadedModel:
    """Verify then load a bundle (blocking; call it off the event loop)."""
    from mobile_export.runtime import BundleRuntime

    manifest = check_bundle(bundle_dir, settings.model_copy(update={"probe": probe}))
    runtime = BundleRuntime(bundle_dir, lazy=settings.lazy, max_loaded=settings.max_loaded)
    if runtime.manifest != manifest:  # replaced between the check and the load: the checked one is authentic
        raise ExportError("bundle_changed", "the manifest changed while the bundle was loading; not taken")
    model = LoadedModel(bundle_dir=bundle_dir, manifest=runtime.manifest, runtime=runtime)
    if not settings.lazy:
        calibrate(model)
    return model
