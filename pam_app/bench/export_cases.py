"""The synthetic cases of ``pam bench-export --case``: random-weight networks at 64x64 for three tasks,
a merged structure against the separate one, each exported to a bundle. Compute, not call overhead,
dominates their latency, which is what the benchmark compares."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from merging.tasks import TaskSpec


def _three_tasks() -> list[TaskSpec]:
    """Two class tasks (5 and 2 labels) and one of three attributes."""
    from merging.tasks import TaskSpec

    return [
        TaskSpec("a", "classes", tuple(f"a{i}" for i in range(5))),
        TaskSpec("b", "classes", ("b0", "b1")),
        TaskSpec("c", "attributes", ("c0", "c1", "c2")),
    ]


def build_vgg64_case(root: Path, log: Callable[[str], None] = print) -> tuple[Path, Path, Path]:
    """Random-weight VGG-style networks at 64x64 for 3 tasks: a merged structure (shared early
    layers, task groups late, pruned widths) and the separate one (three full networks).
    Returns (merged bundle, merged model, separate bundle)."""
    import torch

    from merging.arch import create_arch
    from merging.checkpoint import save_model
    from merging.network import MultitaskNet
    from mobile_export.export import ExportConfig, export_bundle

    torch.manual_seed(0)
    tasks = _three_tasks()
    arch = create_arch("vgg", input_size=(64, 64))
    widths = [s.width for s in arch.layers]  # 16 16 32 32 64 64 64
    # merged: the first layers shared, then a shared core plus one group per task (pruned to ~60%)
    merged_layout: list[dict[int, int]] = []
    for i, w in enumerate(widths):
        if i < 3:
            merged_layout.append({7: w})
        else:
            merged_layout.append({7: w // 2, 1: w // 4, 2: w // 4, 4: w // 4})
    separate_layout = [{1: w, 2: w, 4: w} for w in widths]
    merged = MultitaskNet(tasks, arch, merged_layout, meta={"merger": "vgg64-merged (random weights)"}).eval()
    separate = MultitaskNet(tasks, arch, separate_layout, meta={"merger": "separate (random weights)"}).eval()
    root.mkdir(parents=True, exist_ok=True)
    mpath = save_model(merged, root / "vgg64_merged")
    spath = save_model(separate, root / "vgg64_separate")
    cfg = ExportConfig(max_batch=4, lite=False, measure=True, memory=True, preprocessing=None, force=True)
    log("exporting the vgg64 merged bundle ...")
    export_bundle(mpath, root / "vgg64-merged", cfg, log=log)
    log("exporting the vgg64 separate bundle ...")
    sep_cfg = ExportConfig(max_batch=4, lite=False, measure=False, memory=False, force=True)
    export_bundle(spath, root / "vgg64-separate", sep_cfg, log=log)
    return root / "vgg64-merged", mpath, root / "vgg64-separate"


def build_mobilenetv2_case(
    root: Path, width_mult: float = 0.5, log: Callable[[str], None] = print
) -> tuple[Path, Path, Path]:
    """Random-weight MobileNetV2-style networks at 64x64 for 3 tasks: a merged structure (the
    stem and the first half of the blocks shared, then a shared core of half the width plus one
    quarter-width group per task, as PAM-style merging and pruning leave it) and the separate one
    (three full networks). Depthwise and add layers, and the producers an addition sums, take the
    groups of the layers they are coupled to. Returns (merged bundle, merged model, separate bundle)."""
    import torch

    from merging.arch import create_arch, resolve
    from merging.checkpoint import save_model
    from merging.network import MultitaskNet
    from mobile_export.export import ExportConfig, export_bundle

    torch.manual_seed(0)
    tasks = _three_tasks()
    arch = create_arch("mobilenetv2", input_size=(64, 64), width_mult=width_mult)
    res = resolve(arch)
    tied = {max(r.source, r.skip): min(r.source, r.skip) for r in res if r.kind == "add" and r.skip is not None}
    split = len(res) // 2
    merged_layout: list[dict[int, int]] = []
    for i, (spec, r) in enumerate(zip(arch.layers, res, strict=True)):
        if r.kind in ("dw", "add"):
            merged_layout.append(dict(merged_layout[r.source]))
        elif i in tied:
            merged_layout.append(dict(merged_layout[tied[i]]))
        elif i < split:
            merged_layout.append({7: spec.width})
        else:
            w = spec.width
            merged_layout.append({7: max(1, w // 2), 1: max(1, w // 4), 2: max(1, w // 4), 4: max(1, w // 4)})
    separate_layout = [{1: s.width, 2: s.width, 4: s.width} for s in arch.layers]
    merged = MultitaskNet(tasks, arch, merged_layout, meta={"merger": "mobilenetv2-64 merged (random weights)"})
    separate = MultitaskNet(tasks, arch, separate_layout, meta={"merger": "separate (random weights)"})
    for net in (merged, separate):
        net.eval()
    root.mkdir(parents=True, exist_ok=True)
    mpath = save_model(merged, root / "mobilenetv2_64_merged")
    spath = save_model(separate, root / "mobilenetv2_64_separate")
    log("exporting the mobilenetv2-64 merged bundle (every combination) ...")
    export_bundle(mpath, root / "mobilenetv2-64-merged", ExportConfig(max_batch=4, force=True), log=log)
    log("exporting the mobilenetv2-64 separate bundle (single-task methods) ...")
    sep_cfg = ExportConfig(max_batch=4, force=True, combinations=[t.name for t in tasks])
    export_bundle(spath, root / "mobilenetv2-64-separate", sep_cfg, log=log)
    return root / "mobilenetv2-64-merged", mpath, root / "mobilenetv2-64-separate"
