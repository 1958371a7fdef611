"""Bundle formats, one module each: ``executorch`` (model.pte, always) and ``torchscript_lite``
(model.ptl, ``--lite``). The contract is :class:`Exporter`; the registry finds every module here."""

from __future__ import annotations

from mobile_export.exporters.base import Artifact, Check, Exporter, ExportJob
from mobile_export.exporters.registry import exporter_names, get_exporter, register_exporter

__all__ = ["Artifact", "Check", "ExportJob", "Exporter", "exporter_names", "get_exporter", "register_exporter"]
