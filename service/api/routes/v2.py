"""KServe V2 (Open Inference Protocol) endpoints, so existing clients work unchanged.

``outputs`` in an infer request selects the tasks (the method of their combination runs); the
output tensors are per-task probabilities (softmax for classes, sigmoid for attributes), (N, K).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from service import inference, preprocess
from service.api.deps import PoolDep
from service.api.errors import ERROR_RESPONSES
from service.errors import ServiceError
from service.runtime_pool import LoadedModel, RuntimePool
from service.schemas import V2InferRequest, V2InferResponse, V2Live, V2ModelMetadata, V2Ready, V2Tensor, V2TensorMeta

router = APIRouter(prefix="/v2", tags=["kserve-v2"])
INPUT_NAME = "input"
_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}}}}}


def _model(pool: RuntimePool, name: str) -> LoadedModel:
    model = pool.current()
    if name != model.manifest.model_name:
        raise ServiceError(404, "unknown_model", f"model {name!r} is not loaded; loaded: {model.manifest.model_name!r}")
    return model


@router.get("/health/live", response_model=V2Live)
async def live() -> V2Live:
    return V2Live(live=True)


@router.get("/health/ready", response_model=V2Ready, responses={503: {"model": V2Ready}})
async def ready(pool: PoolDep, request: Request) -> V2Ready:
    """True once the model can answer; 503 (and false) while loading or after a failed load."""
    if not pool.ready:
        raise ServiceError(503, "not_ready", pool.error or "the model is still loading", extra={"ready": False})
    return V2Ready(ready=True)


@router.get("/models/{name}", response_model=V2ModelMetadata, responses=ERROR_RESPONSES)
async def metadata(name: str, pool: PoolDep) -> V2ModelMetadata:
    m = _model(pool, name).manifest
    return V2ModelMetadata(
        name=m.model_name, versions=[m.model_version], platform="executorch",
        inputs=[V2TensorMeta(name=INPUT_NAME, datatype="FP32", shape=[-1, *m.input.shape])],
        outputs=[V2TensorMeta(name=t.name, datatype="FP32", shape=[-1, len(t.labels)]) for t in m.tasks],
    )


@router.get("/models/{name}/ready", response_model=V2Ready, responses=ERROR_RESPONSES)
async def model_ready(name: str, pool: PoolDep) -> V2Ready:
    _model(pool, name)
    return V2Ready(ready=pool.ready)


@router.post("/models/{name}/infer", response_model=V2InferResponse, responses=ERROR_RESPONSES,
             openapi_extra=_BODY_DOC)
async def infer(name: str, request: Request, pool: PoolDep) -> V2InferResponse:
    t0 = time.perf_counter()
    model = _model(pool, name)
    manifest = model.manifest
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype not in ("application/json", ""):
        raise ServiceError(415, "unsupported_media_type", f"content type {ctype!r}; send application/json")
    payload = preprocess.parse_json(await request.body())
    try:
        req = V2InferRequest.model_validate(payload)
    except ValueError as e:
        raise ServiceError(422, "invalid_request", f"not a V2 inference request: {str(e)[:300]}") from e
    if len(req.inputs) != 1:
        raise ServiceError(422, "bad_inputs", f"expected one input tensor {INPUT_NAME!r}, got {len(req.inputs)}")
    tensor = req.inputs[0]
    if tensor.datatype != "FP32":
        raise ServiceError(422, "bad_dtype", f"input datatype must be FP32, got {tensor.datatype}")
    tasks = [o.name for o in req.outputs] if req.outputs else None
    method = inference.choose_method(manifest, tasks)
    request.state.combination = method.name
    x = preprocess.check_tensor(tensor.data, manifest, shape=tensor.shape)
    t1 = time.perf_counter()
    ex = await inference.run_method(pool, request, model, method, x)
    by_task = dict(zip(method.tasks, ex.outputs, strict=True))
    order = list(dict.fromkeys(tasks)) if tasks else method.tasks
    outputs = []
    for task_name in order:
        probs = preprocess.scores_of(manifest.task(task_name).kind, by_task[task_name])
        outputs.append(V2Tensor(name=task_name, shape=list(probs.shape), datatype="FP32",
                                data=[float(v) for v in probs.reshape(-1)]))
    t2 = time.perf_counter()
    timings = {"preprocess": round((t1 - t0) * 1e3, 4), "queue": round(ex.queue_s * 1e3, 4),
               "execute": round(ex.execute_s * 1e3, 4), "total": round((t2 - t0) * 1e3, 4)}
    request.state.timings_ms = timings
    request.app.state.window.add(method.name, timings["total"], timings["execute"])
    return V2InferResponse(
        model_name=manifest.model_name, model_version=manifest.model_version, id=req.id or uuid.uuid4().hex,
        parameters={"combination": method.name, "method": method.name, "macs": method.macs,
                    "timings_ms": timings, "content": "probabilities"},
        outputs=outputs,
    )
