"""The one contract of a bundle format: :class:`Exporter` turns the combinations into one file
(:class:`Artifact`) and checks that file against eager (:class:`Check`).

The pipeline (``mobile_export.pipeline``) runs every exporter of an export the same way: ``export``
before the bundle directory exists, the artifact written into it, the manifest saved, then
``verify`` on the written file. A *required* exporter's failed check fails the export; an optional
one's file is left out and the manifest says why.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from merging.network import MultitaskNet
    from mobile_export.phases import Phases

BUNDLE_STEM = "model"  # every exporter's file is model<suffix> in the bundle


@dataclass(frozen=True)
class ExportJob:
    """What every exporter is given."""

    net: MultitaskNet  # in eval mode, checked exportable
    combos: tuple[tuple[str, ...], ...]  # canonical combinations, in request order
    max_batch: int  # largest batch every method accepts
    phases: Phases  # times each phase and shows its progress bar; exporters record their own phases in it
    workers: int = 1  # processes an exporter may run side by side
    log_path: Path | None = None  # where child processes write what the libraries print
    seed: int = 0  # of the verification inputs


@dataclass
class Artifact:
    """One exporter's file, in memory until the pipeline writes it into the bundle."""

    exporter: str  # the name of the exporter that made it
    file: str  # file name in the bundle, e.g. model.pte
    data: bytes | None  # None: not produced (``status`` says why)
    status: str  # "ok: ..." or "not produced: ..."
    methods: dict[str, str] = field(default_factory=dict)  # combination name -> method name in the file
    details: dict[str, Any] = field(default_factory=dict)  # what the exporter measured, for report.json

    @property
    def produced(self) -> bool:
        return self.data is not None

    @property
    def sha256(self) -> str | None:
        return None if self.data is None else hashlib.sha256(self.data).hexdigest()

    def dropped(self, why: str) -> Artifact:
        """The same artifact, not shipped: its file failed the check."""
        return Artifact(self.exporter, self.file, None, f"not produced: {why}", {}, self.details)


@dataclass(frozen=True)
class Check:
    """The outcome of :meth:`Exporter.verify`: ``problem`` is None when the file matches eager."""

    problem: str | None  # one line for the user, None when the check passed
    report: dict[str, Any] = field(default_factory=dict)  # per-method detail, kept in report.json

    @property
    def ok(self) -> bool:
        return self.problem is None


class Exporter(ABC):
    """A bundle format. Subclass, set the class attributes, implement ``export`` and ``verify``,
    decorate with :func:`~mobile_export.exporters.register_exporter`, and put the file in
    ``mobile_export/exporters/``: ``ExportConfig(exporters=(name,))`` then runs it."""

    name: ClassVar[str]  # registry key, e.g. "executorch"
    suffix: ClassVar[str]  # file suffix, e.g. ".pte"
    required: ClassVar[bool] = False  # a failed check fails the export (True) or leaves the file out (False)
    verify_phase: ClassVar[str] = "verify"  # the phase name verification is recorded under in report.json

    @property
    def file_name(self) -> str:
        return BUNDLE_STEM + self.suffix

    @abstractmethod
    def export(self, job: ExportJob) -> Artifact:
        """One file holding a method per combination of ``job.combos``."""

    @abstractmethod
    def verify(self, artifact: Artifact, bundle: Path, job: ExportJob) -> Check:
        """Load ``bundle / artifact.file`` and compare every method with eager."""

    def manifest_fields(self, artifact: Artifact | None) -> dict[str, Any]:
        """Manifest fields this format fills (``None``: the exporter was not run)."""
        return {}

    def method_fields(self, artifact: Artifact, method: str) -> dict[str, Any]:
        """Fields of the manifest's entry for ``method`` (a canonical combination name)."""
        return {}
