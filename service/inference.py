"""One inference, from request body to response: pick the combination's method, run only it."""

from __future__ import annotations

import time

import numpy as np
from starlette.requests import Request

from mobile_export.errors import ExportError
from mobile_export.manifest import Manifest, MethodEntry
from service import preprocess
from service.errors import ServiceError
from service.runtime_pool import Execution, LoadedModel, RuntimePool
from service.schemas import InferResponse, TaskPrediction, Timings

_CLIENT_CODES = {"unknown_task": 400, "empty_combination": 400, "combination_not_exported": 404}


def choose_method(manifest: Manifest, tasks: list[str] | str | None) -> MethodEntry:
    """Requested tasks -> the method of their canonical combination, or a 4xx listing what is valid."""
    try:
        return manifest.method_for(tasks)
    except ExportError as e:
        extra: dict[str, object] = {"valid_tasks": manifest.task_names}
        if e.code == "combination_not_exported":
            extra["exported_combinations"] = [m.name for m in manifest.methods]
        raise ServiceError(_CLIENT_CODES.get(e.code, 400), e.code, e.message, extra=extra) from e


async def body_to_input(request: Request, manifest: Manifest) -> np.ndarray:
    """The body as the network input, by content type: JSON tensor, multipart image, or raw image."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=4)
        except ServiceError:
            raise
        except Exception as e:  # python-multipart's parse errors are not one type
            raise ServiceError(400, "bad_multipart", f"cannot parse the multipart body: {str(e)[:200]}") from e
        try:
            upload = form.get("image") or next((v for v in form.values() if hasattr(v, "read")), None)
            if upload is None or isinstance(upload, str):
                raise ServiceError(400, "missing_image", "multipart body has no file part (name it 'image')")
            file_type = (upload.content_type or "").lower()
            if file_type and file_type not in preprocess.IMAGE_TYPES and file_type != "application/octet-stream":
                raise ServiceError(415, "unsupported_media_type",
                                   f"file of type {file_type}; send image/png or image/jpeg")
            data = await upload.read()
        finally:
            await form.close()
        return preprocess.decode_image(data, manifest)
    body = await request.body()
    if ctype in preprocess.IMAGE_TYPES or ctype == "application/octet-stream":
        return preprocess.decode_image(body, manifest)
    if ctype in ("application/json", ""):
        return preprocess.tensor_from_json(body, manifest)
    raise ServiceError(415, "unsupported_media_type",
                       f"content type {ctype!r}; send application/json, multipart/form-data, image/png or image/jpeg")


def predictions(manifest: Manifest, method: MethodEntry, outputs: list[np.ndarray]) -> list[dict[str, TaskPrediction]]:
    n = outputs[0].shape[0]
    per_item: list[dict[str, TaskPrediction]] = [{} for _ in range(n)]
    for task_name, logits in zip(method.tasks, outputs, strict=True):
        task = manifest.task(task_name)
        probs = preprocess.scores_of(task.kind, logits)
        for i in range(n):
            scores = {lab: float(p) for lab, p in zip(task.labels, probs[i], strict=True)}
            if task.kind == "classes":
                label: str | list[str] = task.labels[int(np.argmax(probs[i]))]
            else:
                label = [lab for lab, p in scores.items() if p >= 0.5]
            per_item[i][task_name] = TaskPrediction(label=label, scores=scores)
    return per_item


async def run_method(pool: RuntimePool, request: Request, model: LoadedModel, method: MethodEntry,
                     x: np.ndarray) -> Execution:
    """Execute, translating the runtime's input errors to 422, and record what the log line needs."""
    st = request.state
    st.combination, st.method, st.batch = method.name, method.name, int(x.shape[0])
    try:
        return await pool.execute(model, method.name, x)
    except ExportError as e:
        raise ServiceError(422, e.code, e.message) from e


async def infer(pool: RuntimePool, request: Request, tasks: str | None) -> InferResponse:
    t0 = time.perf_counter()
    model = pool.current()
    manifest = model.manifest
    method = choose_method(manifest, tasks)
    request.state.combination = method.name
    x = await body_to_input(request, manifest)
    t1 = time.perf_counter()
    ex = await run_method(pool, request, model, method, x)
    preds = predictions(manifest, method, ex.outputs)
    t2 = time.perf_counter()
    timings = Timings(preprocess=round((t1 - t0) * 1e3, 4), queue=round(ex.queue_s * 1e3, 4),
                      execute=round(ex.execute_s * 1e3, 4), total=round((t2 - t0) * 1e3, 4))
    request.state.timings_ms = timings.model_dump()
    request.app.state.window.add(method.name, timings.total, timings.execute)
    return InferResponse(request_id=request.state.request_id, model=manifest.model_name,
                         model_version=manifest.model_version, combination=method.name, method=method.name,
                         macs=method.macs, batch=int(x.shape[0]), predictions=preds, timings_ms=timings)
