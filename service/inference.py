"""One inference, from request body to response: resolve the method, run only it, answer the tasks asked."""

from __future__ import annotations

import time

import numpy as np
from starlette.requests import Request

from mobile_export.errors import ExportError
from mobile_export.manifest import Manifest, MethodEntry
from service import preprocess
from service.combinations import Resolved, resolve, split_tasks
from service.errors import ServiceError
from service.runtime_pool import Execution, LoadedModel, RuntimePool
from service.schemas import InferResponse, TaskPrediction, Timings


def strict_requested(request: Request, default: bool) -> bool:
    """``strict=true`` in the query (or the ``PAM_STRICT_COMBINATIONS`` setting) refuses supersets."""
    raw = request.query_params.get("strict")
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ServiceError(400, "bad_parameter", f"strict={raw[:40]!r}: use true or false")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (declared or counted)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, "body_too_large", f"a body of {declared} bytes exceeds {limit} bytes for this input")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, "body_too_large", f"request body exceeds {limit} bytes for this input")
        chunks.append(chunk)
    return b"".join(chunks)


async def body_to_input(request: Request, manifest: Manifest) -> np.ndarray:
    """The body as the network input, by content type: JSON tensor, multipart image, or raw image."""
    settings = request.app.state.settings
    max_pixels = settings.max_image_pixels
    inline = settings.decode_inline_pixels
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
        return await preprocess.decode_image_async(data, manifest, max_pixels, inline)
    if ctype in preprocess.IMAGE_TYPES or ctype == "application/octet-stream":
        body = await request.body()
        return await preprocess.decode_image_async(body, manifest, max_pixels, inline)
    if ctype in ("application/json", ""):
        body = await read_body(request, preprocess.json_body_limit(manifest, settings.max_body_bytes))
        return await preprocess.off_loop(preprocess.tensor_from_json, body, manifest, size=len(body))
    raise ServiceError(415, "unsupported_media_type",
                       f"content type {ctype!r}; send application/json, multipart/form-data, image/png or image/jpeg")


def predictions(manifest: Manifest, tasks: list[str], method: MethodEntry,
                outputs: list[np.ndarray]) -> list[dict[str, TaskPrediction]]:
    """Per image, the requested ``tasks`` only (a superset method's extra outputs are dropped)."""
    by_task = dict(zip(method.tasks, outputs, strict=True))
    n = outputs[0].shape[0]
    per_item: list[dict[str, TaskPrediction]] = [{} for _ in range(n)]
    for task_name in tasks:
        task = manifest.task(task_name)
        probs = preprocess.scores_of(task.kind, by_task[task_name])
        for i in range(n):
            scores = {lab: float(p) for lab, p in zip(task.labels, probs[i], strict=True)}
            if task.kind == "classes":
                label: str | list[str] = task.labels[int(np.argmax(probs[i]))]
            else:
                label = [lab for lab, p in scores.items() if p >= 0.5]
            per_item[i][task_name] = TaskPrediction(label=label, scores=scores)
    return per_item


def note_resolved(request: Request, resolved: Resolved) -> None:
    """What the log line and the metrics need: the requested combination and the method that ran."""
    st = request.state
    st.combination, st.method = resolved.combination, resolved.method.name


async def run_method(pool: RuntimePool, request: Request, model: LoadedModel, method: MethodEntry,
                     x: np.ndarray) -> Execution:
    """Execute, translating the runtime's input errors to 422, and record what the log line needs."""
    st = request.state
    st.method, st.batch = method.name, int(x.shape[0])
    try:
        ex = await pool.execute(model, method.name, x)
    except ExportError as e:
        raise ServiceError(422, e.code, e.message) from e
    st.executed_batch = ex.batch_rows
    return ex


async def infer(pool: RuntimePool, request: Request, tasks: list[str] | None) -> InferResponse:
    t0 = time.perf_counter()
    model = pool.current()
    manifest = model.manifest
    strict = strict_requested(request, request.app.state.settings.strict_combinations)
    resolved = resolve(manifest, split_tasks(tasks), strict=strict)
    note_resolved(request, resolved)
    x = await body_to_input(request, manifest)
    t1 = time.perf_counter()
    ex = await run_method(pool, request, model, resolved.method, x)
    preds = predictions(manifest, resolved.tasks, resolved.method, ex.outputs)
    t2 = time.perf_counter()
    timings = Timings(preprocess=round((t1 - t0) * 1e3, 4), queue=round(ex.queue_s * 1e3, 4),
                      execute=round(ex.execute_s * 1e3, 4), total=round((t2 - t0) * 1e3, 4))
    request.state.timings_ms = timings.model_dump()
    request.app.state.window.add(resolved.combination, timings.total, timings.execute)
    return InferResponse(request_id=request.state.request_id, model=manifest.model_name,
                         model_version=manifest.model_version, combination=resolved.combination,
                         method=resolved.method.name, superset=resolved.superset, macs=resolved.method.macs,
                         batch=int(x.shape[0]), executed_batch=ex.batch_rows, predictions=preds,
                         timings_ms=timings)
