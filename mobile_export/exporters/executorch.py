"""``model.pte``: one ExecuTorch program, one XNNPACK-lowered method per combination, weights stored
once; checked by running every method through the real ExecuTorch runtime (``verify_bundle``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mobile_export import lowering
from mobile_export.errors import ExportError
from mobile_export.exporters.base import Artifact, Check, Exporter, ExportJob
from mobile_export.exporters.registry import register_exporter
from pam_common.combinations import combination_name


@register_exporter
class ExecuTorchExporter(Exporter):
    name: ClassVar[str] = "executorch"
    suffix: ClassVar[str] = ".pte"
    required: ClassVar[bool] = True

    def export(self, job: ExportJob) -> Artifact:
        methods = self._lower(job)
        with job.phases.phase("serialize", 1) as bar:
            # looked up on the module at call time: export_phases swaps these to time the old export
            program = lowering.merge_methods(methods)
            bar.update(1)
        names = {combination_name(c): combination_name(c) for c in job.combos}
        return Artifact(self.name, self.file_name, program, "ok: lowered with XNNPACK", names)

    def _lower(self, job: ExportJob) -> list[lowering.LoweredMethod]:
        log_file = open(job.log_path, "a") if job.log_path is not None else None
        try:
            with job.phases.phase("lower", len(job.combos)) as bar:
                def done(m: lowering.LoweredMethod) -> None:
                    bar.update(1)
                    bar.set_postfix_str(m.name, refresh=False)

                methods = lowering.lower_methods(job.net, list(job.combos), job.max_batch, workers=job.workers,
                                                 on_done=done, log_file=log_file)
        except Exception as e:  # torch.export / ExecuTorch raise many types; the user needs one clear error
            why = f"{type(e).__name__}: {e}"
            raise ExportError("lowering_failed", f"torch.export/XNNPACK lowering failed: {why}") from e
        finally:
            if log_file is not None:
                log_file.close()
        job.phases.add_detail("lower", {
            "torch_export_s": round(sum(m.export_s for m in methods), 3),
            "to_edge_s": round(sum(m.edge_s for m in methods), 3),
            "to_edge_transform_and_lower_s": round(sum(m.edge_s + m.lower_s for m in methods), 3),
            "to_executorch_s": round(sum(m.emit_s for m in methods), 3),
            "workers": job.workers,
            "note": "sums of wall time over all processes (with workers > 1 they exceed the phase's wall "
                    "time); torch_export_s and to_edge_s: the base, once per process; "
                    "to_edge_transform_and_lower_s includes to_edge_s",
        })
        return methods

    def verify(self, artifact: Artifact, bundle: Path, job: ExportJob) -> Check:
        from mobile_export.verify import verify_bundle

        with job.phases.phase(self.verify_phase, len(job.combos)) as bar:
            v = verify_bundle(bundle, net=job.net, seed=job.seed, strict=False, on_method=lambda _: bar.update(1))
        return Check(None if v["ok"] else f"bundle does not match eager: {v['failures']}", v)

    def manifest_fields(self, artifact: Artifact | None) -> dict[str, Any]:
        if artifact is None or artifact.data is None:
            raise ExportError("no_program", "a bundle needs its ExecuTorch program")
        return {"program": artifact.file, "program_sha256": artifact.sha256}


def all_task_program(job: ExportJob, program: bytes) -> bytes:
    """The all-task method alone, lowered on its own: what the other methods' size is measured against."""
    full = tuple(sorted(job.net.task_names))
    if list(job.combos) == [full]:
        return program
    return lowering.merge_methods(lowering.lower_methods(job.net, [full], job.max_batch))
