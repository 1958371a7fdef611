"""What one export is asked to do: :class:`ExportConfig`, one field per ``pam export`` option."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_AUTO_TASKS = 6  # above this many tasks (63 methods) the caller must choose --combinations
DEFAULT_MAX_BATCH = 8
PROGRAM_EXPORTER = "executorch"  # the exporter every bundle has: model.pte, verified with the ExecuTorch runtime
LITE_EXPORTER = "torchscript-lite"  # what ``lite=True`` adds


@dataclass(frozen=True)
class ExportConfig:
    combinations: Sequence[str | Sequence[str]] | None = None  # None: every combination (<= MAX_AUTO_TASKS tasks)
    max_batch: int = DEFAULT_MAX_BATCH  # largest batch every method accepts (dynamic batch dimension)
    lite: bool = False  # also write model.ptl for the TorchScript lite interpreter (deprecated upstream)
    exporters: tuple[str, ...] = ()  # further registered exporters to run besides ExecuTorch, by name
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

    def exporter_names(self) -> list[str]:
        """The exporters to run, in order: ExecuTorch first, then ``exporters``, then lite if asked."""
        names = [PROGRAM_EXPORTER, *self.exporters, *([LITE_EXPORTER] if self.lite else [])]
        return list(dict.fromkeys(names))
