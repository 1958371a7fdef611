"""The bundle manifest: a versioned pydantic schema that devices and the service read.

Deliberately free of ``merging`` and torch imports: the service (like a phone) reads a bundle
with the ExecuTorch runtime and this schema only.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mobile_export.errors import ExportError
from pam_common.atomic import atomic_write_json
from pam_common.combinations import canonical_combination, combination_name

SCHEMA_VERSION: Literal[1] = 1
MANIFEST_FILE = "manifest.json"
PROGRAM_FILE = "model.pte"
LITE_FILE = "model.ptl"
REPORT_FILE = "report.json"
EXPECTED_OUTPUTS_FILE = "expected_outputs.pt"  # sample inputs and eager outputs, for `pam verify` without the model
# What bundles written before issue 21 called the expected outputs: the file (their manifest names it,
# so it is still read) and the manifest keys (read as the new ones).
LEGACY_EXPECTED_OUTPUTS_FILE = "reference.pt"
_LEGACY_KEYS = {"reference": "expected_outputs", "reference_sha256": "expected_outputs_sha256"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskEntry(_Strict):
    name: str
    kind: Literal["classes", "attributes"]  # classes: softmax over labels; attributes: one sigmoid each
    labels: list[str] = Field(min_length=1)


class InputSpec(_Strict):
    shape: list[int] = Field(min_length=3, max_length=3)  # (C, H, W) of one image, batch excluded
    dtype: Literal["float32"] = "float32"
    max_batch: int = Field(ge=1)  # largest batch every method accepts


class Preprocessing(_Strict):
    """Raw image -> input: resize to ``size``, convert to ``channel_order``, pixel * ``scale``,
    optionally ``1 - x``, then ``(x - mean) / std`` per channel; layout NCHW."""

    size: list[int] = Field(min_length=2, max_length=2)  # (H, W)
    channel_order: Literal["L", "RGB"]
    scale: float = 1.0 / 255.0
    invert: bool = False
    mean: list[float]
    std: list[float]
    resize: Literal["bilinear"] = "bilinear"


class MethodEntry(_Strict):
    name: str  # the .pte method name: the canonical combination, e.g. "digit+parity"
    tasks: list[str]  # outputs of the method, in this order (sorted task names)
    macs: int = Field(ge=0)
    params: int = Field(ge=0)
    lite_method: str | None = None  # the same combination's method in model.ptl (an identifier), if any


class Provenance(_Strict):
    merger: str | None = None
    pruner: str | None = None
    sources: dict[str, str] = Field(default_factory=dict)  # source checkpoint -> sha256
    packages: dict[str, str] = Field(default_factory=dict)  # package -> version used to export
    created: str | None = None  # ISO 8601 UTC


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    model_name: str
    model_version: str
    program: str = PROGRAM_FILE
    program_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    lite_program: str | None = None  # model.ptl, or None when not produced
    lite_status: str = "not produced"  # why there is (or is not) a lite program
    tasks: list[TaskEntry] = Field(min_length=1)
    input: InputSpec
    preprocessing: Preprocessing
    preprocessing_source: str = "model meta"  # where the preprocessing came from (model, file, data set, default)
    methods: list[MethodEntry] = Field(min_length=1)
    expected_outputs: str | None = None  # tensors-only file of sample inputs and eager outputs (EXPECTED_OUTPUTS_FILE)
    expected_outputs_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    accuracy: dict[str, float] = Field(default_factory=dict)  # task -> test accuracy in percent
    provenance: Provenance = Field(default_factory=Provenance)

    @model_validator(mode="before")
    @classmethod
    def _legacy_keys(cls, data: Any) -> Any:
        """Older bundles name the expected outputs ``reference`` / ``reference_sha256``: read them as the
        new keys (a manifest carrying both spellings of one key stays an error: extra keys are forbidden)."""
        if isinstance(data, dict) and any(old in data and new not in data for old, new in _LEGACY_KEYS.items()):
            data = dict(data)
            for old, new in _LEGACY_KEYS.items():
                if old in data and new not in data:
                    data[new] = data.pop(old)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names {names}")
        seen: set[str] = set()
        for m in self.methods:
            if m.name in seen:
                raise ValueError(f"duplicate method {m.name}")
            seen.add(m.name)
            # the one combination rule (pam_common), refusing here what a request would have normalised
            tasks = canonical_combination(m.tasks, names, lambda _code, why, n=m.name: ValueError(f"method {n}: {why}"))
            if list(tasks) != m.tasks:
                raise ValueError(f"method {m.name}: tasks {m.tasks} must be sorted, distinct, known")
            if m.name != combination_name(m.tasks):
                raise ValueError(f"method {m.name}: name must be the canonical combination {combination_name(m.tasks)}")
        return self

    # ------------------------------------------------------------------ queries
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskEntry:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ExportError("unknown_task", f"unknown task {name!r}; known tasks: {', '.join(self.task_names)}")

    def canonical(self, requested: Iterable[str] | str | None) -> list[str]:
        """Validate and normalise requested tasks (order, duplicates); ``None`` means all tasks."""
        if requested is None:
            return sorted(self.task_names)
        return list(canonical_combination(requested, self.task_names, ExportError))

    def method_for(self, requested: Iterable[str] | str | None) -> MethodEntry:
        """The method that runs exactly the requested combination."""
        name = combination_name(self.canonical(requested))
        for m in self.methods:
            if m.name == name:
                return m
        raise ExportError(
            "combination_not_exported",
            f"combination {name} was not exported; exported: {', '.join(m.name for m in self.methods)}",
        )

    # ------------------------------------------------------------------ files
    @staticmethod
    def load(path: str | Path) -> Manifest:
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_FILE
        try:
            return Manifest.model_validate_json(p.read_bytes())
        except FileNotFoundError as e:
            raise ExportError("missing_manifest", f"no manifest at {p}") from e
        except ValidationError as e:
            raise ExportError("bad_manifest", f"{p} does not follow manifest schema {SCHEMA_VERSION}: {e}") from e
        except OSError as e:
            raise ExportError("bad_manifest", f"cannot read {p}: {e}") from e

    def save(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / MANIFEST_FILE
        atomic_write_json(p, self.model_dump(mode="json"))
