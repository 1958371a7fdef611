"""Export a multitask network to a bundle: one ExecuTorch program with a method per combination.

Each combination's :class:`~merging.network.CombinationModule` holds the network's own block
modules, so all methods read the same parameter tensors; lowering them into one program lets
ExecuTorch store each weight once.

:func:`export_bundle` checks the request and the network, then runs the phases of
``mobile_export.pipeline`` over one state; the formats written are exporters
(``mobile_export/exporters/``: ExecuTorch always, TorchScript-lite with ``lite=True``, any other
registered one named in ``ExportConfig.exporters``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from merging.checkpoint import load_model
from merging.errors import MergingError
from merging.network import MultitaskNet
from mobile_export.config import ExportConfig
from mobile_export.errors import ExportError
from mobile_export.exporters import get_exporter
from mobile_export.model_meta import accuracy_of, measure_accuracy, resolve_preprocessing
from mobile_export.phases import Phases
from mobile_export.pipeline import LOG_FILE, ExportResult, ExportState, run
from mobile_export.quiet import quiet_stderr
from mobile_export.selection import check_exportable, resolve_combinations

__all__ = ["ExportConfig", "ExportResult", "export_bundle"]


def export_bundle(
    model: MultitaskNet | str | Path, out: str | Path, cfg: ExportConfig | None = None,
    log: Callable[[str], object] = print,
) -> ExportResult:
    """Write a verified bundle for ``model`` (a network, or a path saved by ``save_model``).

    Library noise goes to ``export.log`` in the bundle (next to ``--out`` while the export runs,
    kept there if it fails); ``report.json`` records the time, CPU and peak RSS of every phase."""
    cfg = cfg or ExportConfig()
    if cfg.max_batch < 1:
        raise ExportError("bad_max_batch", f"max batch must be >= 1, got {cfg.max_batch}")
    if cfg.workers is not None and cfg.workers < 1:
        raise ExportError("bad_workers", f"workers must be >= 1, got {cfg.workers}")
    exporters = [get_exporter(name) for name in cfg.exporter_names()]  # unknown names fail before any work
    net, model_path = _load(model)
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
            state = ExportState(
                net=net, model_path=model_path, out=out, cfg=cfg, combos=combos, preprocessing=preprocessing,
                preprocessing_source=pre_origin, accuracy=accuracy, log=log, log_path=log_path,
                phases=Phases(terminal, cfg.progress), exporters=exporters,
            )
            return run(state)
    except BaseException:
        if log_path.exists() and log_path.stat().st_size:
            log(f"export failed; library messages are in {log_path}")
        else:
            log_path.unlink(missing_ok=True)
        raise


def _load(model: MultitaskNet | str | Path) -> tuple[MultitaskNet, Path | None]:
    """The network in eval mode, and the path of its ``.json`` when it came from a file."""
    if not isinstance(model, str | Path):
        return model.eval(), None
    path = Path(model)
    if path.suffix not in (".json", ".pt"):
        path = path.with_suffix(".json")
    try:
        net = load_model(path)
    except MergingError as e:
        raise ExportError(e.code, e.message) from e
    return net.eval(), path.with_suffix(".json")
