"""KServe V2 (Open Inference Protocol) endpoints, so existing clients (``tritonclient[http]``) work unchanged.

``outputs`` in an infer request selects the tasks (the method of their combination runs, or its
cheapest exported superset); the output tensors are per-task probabilities (softmax for classes,
sigmoid for attributes), (N, K). Extensions: binary tensor data (both directions), model
configuration and statistics.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import inference, preprocess, v2_binary
from service.api.deps import PoolDep
from service.api.errors import ERROR_RESPONSES
from service.combinations import resolve
from service.errors import ServiceError
from service.runtime_pool import LoadedModel, RuntimePool
from service.schemas import (
    V2InferRequest,
    V2InferResponse,
    V2Live,
    V2ModelMetadata,
    V2Ready,
    V2ServerMetadata,
    V2TensorMeta,
)

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
INPUT_NAME = "input"
SERVER_NAME = "pam-mobile"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequestDoc"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": "JSON header (Inference-Header-Content-Length "
                                                           "bytes) then the binary tensors"}}}}}


def _model(pool: RuntimePool, name: str, version: str | None = None) -> LoadedModel:
    model = pool.current()
    m = model.manifest
    if name != m.model_name:
        raise ServiceError(404, "unknown_model", f"model {name!r} is not loaded; loaded: {m.model_name!r}")
    if version not in (None, "", m.model_version):
        raise ServiceError(404, "unknown_model", f"model {name!r} has no version {version!r}; "
                                                 f"loaded: {m.model_version!r}")
    return model


@router.get("", response_model=V2ServerMetadata)
async def server_metadata() -> V2ServerMetadata:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("pam-mobile")
    except PackageNotFoundError:  # running from a source tree
        v = "0"
    return V2ServerMetadata(name=SERVER_NAME, version=v, extensions=EXTENSIONS)


@router.get("/health/live", response_model=V2Live)
async def live() -> V2Live:
    return V2Live(live=True)


@router.get("/health/ready", response_model=V2Ready, responses={503: {"model": V2Ready}})
async def ready(pool: PoolDep, request: Request) -> V2Ready:
    """True once the model can answer; 503 (and false) while loading or after a failed load."""
    if not pool.ready:
        raise ServiceError(503, "not_ready", pool.error or "the model is still loading", extra={"ready": False})
    return V2Ready(ready=True)


def _metadata(model: LoadedModel) -> V2ModelMetadata:
    m = model.manifest
    return V2ModelMetadata(
        name=m.model_name, versions=[m.model_version], platform="executorch",
        inputs=[V2TensorMeta(name=INPUT_NAME, datatype="FP32", shape=[-1, *m.input.shape])],
        outputs=[V2TensorMeta(name=t.name, datatype="FP32", shape=[-1, len(t.labels)]) for t in m.tasks],
    )


def _config(model: LoadedModel, pool: RuntimePool) -> dict[str, Any]:
    """Triton's model configuration, with the methods (one per exported combination) as an extra field."""
    m = model.manifest
    s = pool.settings
    cfg: dict[str, Any] = {
        "name": m.model_name, "platform": "executorch", "backend": "executorch", "version_policy": {"latest": {}},
        "max_batch_size": m.input.max_batch,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": m.input.shape}],
        "output": [{"name": t.name, "data_type": "TYPE_FP32", "dims": [len(t.labels)],
                    "label_filename": ""} for t in m.tasks],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {"strict_combinations": {"string_value": str(s.strict_combinations).lower()}},
        "methods": [{"name": e.name, "tasks": e.tasks, "macs": e.macs, "params": e.params} for e in m.methods],
    }
    if s.batching and s.executor == "thread":
        cfg["dynamic_batching"] = {"max_queue_delay_microseconds": s.batch_window_us,
                                   "preferred_batch_size": [pool.batch_limit(model)]}
    return cfg


def _stats(model: LoadedModel, pool: RuntimePool) -> dict[str, Any]:
    m = model.manifest
    return {"model_stats": [pool.stats.model_stats(m.model_name, m.model_version, [e.name for e in m.methods])]}


@router.get("/models/stats")
async def all_stats(pool: PoolDep) -> dict[str, Any]:
    """Statistics of every loaded model (one here), per method under ``methods``."""
    return _stats(pool.current(), pool)


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=ERROR_RESPONSES)
async def metadata(name: str, pool: PoolDep) -> V2ModelMetadata:
    return _metadata(_model(pool, name))


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=ERROR_RESPONSES)
async def metadata_version(name: str, version: str, pool: PoolDep) -> V2ModelMetadata:
    return _metadata(_model(pool, name, version))


@router.get("/models/{name}/ready", response_model=V2Ready, responses=ERROR_RESPONSES)
async def model_ready(name: str, pool: PoolDep) -> V2Ready:
    """200 once the model answers (clients such as tritonclient read the status, not the body)."""
    _model(pool, name)  # 503 not_ready while loading, 404 for another model
    return V2Ready(ready=True)


@router.get("/models/{name}/versions/{version}/ready", response_model=V2Ready, responses=ERROR_RESPONSES)
async def model_ready_version(name: str, version: str, pool: PoolDep) -> V2Ready:
    _model(pool, name, version)
    return V2Ready(ready=True)


@router.get("/models/{name}/config", responses=ERROR_RESPONSES)
async def config(name: str, pool: PoolDep) -> dict[str, Any]:
    """Triton's model configuration extension."""
    return _config(_model(pool, name), pool)


@router.get("/models/{name}/versions/{version}/config", responses=ERROR_RESPONSES)
async def config_version(name: str, version: str, pool: PoolDep) -> dict[str, Any]:
    return _config(_model(pool, name, version), pool)


@router.get("/models/{name}/stats", responses=ERROR_RESPONSES)
async def stats(name: str, pool: PoolDep) -> dict[str, Any]:
    """Triton's statistics extension: request counts and durations, executes, executes per batch size."""
    return _stats(_model(pool, name), pool)


@router.get("/models/{name}/versions/{version}/stats", responses=ERROR_RESPONSES)
async def stats_version(name: str, version: str, pool: PoolDep) -> dict[str, Any]:
    return _stats(_model(pool, name, version), pool)


@router.post("/models/{name}/infer", response_model=V2InferResponse, responses=ERROR_RESPONSES,
             openapi_extra=_BODY_DOC)
async def infer(name: str, request: Request, pool: PoolDep) -> Response:
    return await _infer(request, pool, _model(pool, name))


@router.post("/models/{name}/versions/{version}/infer", response_model=V2InferResponse, responses=ERROR_RESPONSES,
             openapi_extra=_BODY_DOC)
async def infer_version(name: str, version: str, request: Request, pool: PoolDep) -> Response:
    return await _infer(request, pool, _model(pool, name, version))


def _parse(body: bytes, header_length: str | None) -> tuple[V2InferRequest, Any]:
    """Body -> (request, input values); blocking, run off the loop for large bodies."""
    head, tail = v2_binary.split_body(body, header_length)
    payload = preprocess.parse_json(head)
    try:
        req = V2InferRequest.model_validate(payload)
    except (ValueError, RecursionError) as e:
        raise ServiceError(422, "invalid_request", f"not a V2 inference request: {str(e)[:300]}") from e
    if len(req.inputs) != 1:
        raise ServiceError(422, "bad_inputs", f"expected one input tensor {INPUT_NAME!r}, got {len(req.inputs)}")
    tensor = req.inputs[0]
    if tensor.datatype != "FP32":
        raise ServiceError(422, "bad_dtype", f"input datatype must be FP32, got {tensor.datatype}")
    values, used = v2_binary.input_values(tensor, tail, 0)
    if used != len(tail):
        raise ServiceError(422, "bad_binary_size", f"{len(tail) - used} bytes of binary data belong to no input")
    return req, values


async def _infer(request: Request, pool: RuntimePool, model: LoadedModel) -> Response:
    t0 = time.perf_counter()
    manifest = model.manifest
    settings = request.app.state.settings
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", "application/octet-stream", ""):
        raise ServiceError(415, "unsupported_media_type",
                           f"content type {ctype!r}; send application/json (binary tensors: octet-stream or none)")
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise ServiceError(415, "unsupported_encoding", "compressed requests are not accepted; send identity")
    body = await inference.read_body(request, preprocess.json_body_limit(manifest, settings.max_body_bytes))
    req, values = await preprocess.off_loop(_parse, body, request.headers.get(v2_binary.HEADER), size=len(body))
    tensor = req.inputs[0]
    tasks = [o.name for o in req.outputs] if req.outputs else None
    strict = v2_binary.flag(req.parameters, "strict")
    resolved = resolve(manifest, tasks, strict=settings.strict_combinations if strict is None else strict)
    inference.note_resolved(request, resolved)
    x = await preprocess.off_loop(preprocess.check_tensor, values, manifest, tensor.shape, size=len(body))
    t1 = time.perf_counter()
    ex = await inference.run_method(pool, request, model, resolved.method, x)
    by_task = dict(zip(resolved.method.tasks, ex.outputs, strict=True))
    binary_all = bool(v2_binary.flag(req.parameters, "binary_data_output"))
    wanted = {o.name: o for o in req.outputs} if req.outputs else {}
    order = list(dict.fromkeys(tasks)) if tasks else resolved.tasks
    outputs: list[dict[str, Any]] = []
    binaries: list[bytes] = []
    for task_name in order:
        out = wanted.get(task_name)
        params = out.parameters if out is not None else None
        if params and "classification" in params:
            raise ServiceError(422, "unsupported_parameter", "the classification extension is not supported; "
                                                             "outputs are probabilities per label")
        per_output = v2_binary.flag(params, "binary_data")
        probs = preprocess.scores_of(manifest.task(task_name).kind, by_task[task_name]).astype("<f4")
        entry: dict[str, Any] = {"name": task_name, "shape": list(probs.shape), "datatype": "FP32"}
        if per_output if per_output is not None else binary_all:
            raw = probs.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binaries.append(raw)
        else:
            entry["data"] = probs.reshape(-1).tolist()
        outputs.append(entry)
    t2 = time.perf_counter()
    timings = {"preprocess": round((t1 - t0) * 1e3, 4), "queue": round(ex.queue_s * 1e3, 4),
               "execute": round(ex.execute_s * 1e3, 4), "total": round((t2 - t0) * 1e3, 4)}
    request.state.timings_ms = timings
    request.app.state.window.add(resolved.combination, timings["total"], timings["execute"])
    header = {"model_name": manifest.model_name, "model_version": manifest.model_version,
              "id": req.id or uuid.uuid4().hex,
              "parameters": {"combination": resolved.combination, "method": resolved.method.name,
                             "superset": resolved.superset, "macs": resolved.method.macs,
                             "executed_batch": ex.batch_rows, "timings_ms": timings, "content": "probabilities"},
              "outputs": outputs}
    raw, headers = v2_binary.encode_response(header, binaries)
    return Response(raw, headers=headers, media_type=None)
