"""KServe V2 (Open Inference Protocol) endpoints, so existing clients (``tritonclient[http]``) work unchanged.

``outputs`` in an infer request selects the tasks (the method of their combination runs, or its
cheapest exported superset); the output tensors are per-task probabilities (softmax for classes,
sigmoid for attributes), (N, K). Extensions: binary tensor data (both directions), model
configuration and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request

from service import preprocess, v2_binary
from service.api.deps import PoolDep
from service.api.errors import ERROR_RESPONSES
from service.errors import ServiceError
from service.runtime_pool import LoadedModel, RuntimePool
from service.schemas import (
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


def model_named(pool: RuntimePool, name: str, version: str | None = None) -> LoadedModel:
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
    if s.batching:
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
    return _metadata(model_named(pool, name))


@router.get("/models/{name}/versions/{version}", response_model=V2ModelMetadata, responses=ERROR_RESPONSES)
async def metadata_version(name: str, version: str, pool: PoolDep) -> V2ModelMetadata:
    return _metadata(model_named(pool, name, version))


@router.get("/models/{name}/ready", response_model=V2Ready, responses=ERROR_RESPONSES)
async def model_ready(name: str, pool: PoolDep) -> V2Ready:
    """200 once the model answers (clients such as tritonclient read the status, not the body)."""
    model_named(pool, name)  # 503 not_ready while loading, 404 for another model
    return V2Ready(ready=True)


@router.get("/models/{name}/versions/{version}/ready", response_model=V2Ready, responses=ERROR_RESPONSES)
async def model_ready_version(name: str, version: str, pool: PoolDep) -> V2Ready:
    model_named(pool, name, version)
    return V2Ready(ready=True)


@router.get("/models/{name}/config", responses=ERROR_RESPONSES)
async def config(name: str, pool: PoolDep) -> dict[str, Any]:
    """Triton's model configuration extension."""
    return _config(model_named(pool, name), pool)


@router.get("/models/{name}/versions/{version}/config", responses=ERROR_RESPONSES)
async def config_version(name: str, version: str, pool: PoolDep) -> dict[str, Any]:
    return _config(model_named(pool, name, version), pool)


@router.get("/models/{name}/stats", responses=ERROR_RESPONSES)
async def stats(name: str, pool: PoolDep) -> dict[str, Any]:
    """Triton's statistics extension: request counts and durations, executes, executes per batch size."""
    return _stats(model_named(pool, name), pool)


@router.get("/models/{name}/versions/{version}/stats", responses=ERROR_RESPONSES)
async def stats_version(name: str, version: str, pool: PoolDep) -> dict[str, Any]:
    return _stats(model_named(pool, name, version), pool)


_REQUEST_KEYS = frozenset(("id", "parameters", "inputs", "outputs"))
_INPUT_KEYS = frozenset(("name", "shape", "datatype", "data", "parameters"))
_OUTPUT_KEYS = frozenset(("name", "parameters"))


@dataclass
class V2Request:
    """A checked V2 inference request (parsed by hand: no pydantic model over the tensor values)."""

    id: str | None
    tasks: list[str] | None  # the requested outputs (None: all tasks)
    binary: dict[str, bool]  # per output: binary_data when given
    binary_all: bool
    strict: bool | None
    shape: list[int]
    values: Any  # nested/flat list, or a float32 array from the binary tail
    may_have_bools: bool


def _invalid(why: str) -> ServiceError:
    return ServiceError(422, "invalid_request", f"not a V2 inference request: {why}")


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    if "parameters" not in obj:
        return {}
    p = obj["parameters"]
    if not isinstance(p, dict):  # null too: the schema says object
        raise _invalid(f"{where}.parameters must be an object")
    return p


def parse_v2(body: bytes, header_length: str | None, manifest: Any) -> V2Request:
    """Body -> a checked request; every departure from the protocol (and from this model) is a 4xx with
    its reason: unknown keys, an input other than ``input``, ``outputs: []``, unknown output names or
    parameters, shapes that are not (N, C, H, W), booleans or non-numbers among the values."""
    head, tail = v2_binary.split_body(body, header_length)
    payload = preprocess.parse_object(head, _REQUEST_KEYS, _invalid)
    rid = payload.get("id")
    if "id" in payload and not isinstance(rid, str):
        raise _invalid("id must be a string")
    params = _params(payload, "request")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _invalid("inputs must be a non-empty list")
    if len(inputs) != 1:
        raise ServiceError(422, "bad_inputs", f"expected one input tensor {INPUT_NAME!r}, got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise _invalid("inputs[0] must be an object")
    extra = set(tensor) - _INPUT_KEYS
    if extra:
        raise _invalid(f"unknown field(s) of inputs[0]: {', '.join(sorted(map(str, extra)))[:100]}")
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str) or not isinstance(shape, list) or not isinstance(datatype, str):
        raise _invalid("inputs[0] needs name (string), shape (list of integers) and datatype (string)")
    if name != INPUT_NAME:
        raise ServiceError(400, "unknown_input", f"model {manifest.model_name!r} has one input, {INPUT_NAME!r}; "
                                                 f"got {name[:60]!r}")
    if datatype != "FP32":
        raise ServiceError(422, "bad_dtype", f"input datatype must be FP32, got {datatype[:20]}")
    if len(shape) != 4 or any(type(d) is not int or d < 0 for d in shape):
        raise ServiceError(422, "bad_shape", f"shape must be [N, {', '.join(map(str, manifest.input.shape))}] "
                                             f"(integers), got {str(shape)[:80]}")
    in_params = _params(tensor, "inputs[0]")
    if set(in_params) - {"binary_data_size"}:
        raise ServiceError(422, "unsupported_parameter", "the only input parameter is binary_data_size")
    data = tensor.get("data")
    if "data" in tensor and not isinstance(data, list):
        raise _invalid("inputs[0].data must be a list of numbers")

    class _T:  # what v2_binary.input_values reads
        pass

    t = _T()
    t.name, t.shape, t.datatype, t.data, t.parameters = name, shape, datatype, data, in_params  # type: ignore[attr-defined]
    values, used = v2_binary.input_values(t, tail, 0)
    if used != len(tail):
        raise ServiceError(422, "bad_binary_size", f"{len(tail) - used} bytes of binary data belong to no input")
    outputs = payload.get("outputs")
    tasks: list[str] | None = None
    binary: dict[str, bool] = {}
    if "outputs" in payload:
        if not isinstance(outputs, list):
            raise _invalid("outputs must be a list")
        if not outputs:
            raise ServiceError(400, "empty_combination", "outputs is empty: name at least one output (task), or "
                                                         "omit outputs for all tasks")
        tasks = []
        for i, o in enumerate(outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise _invalid(f"outputs[{i}] must be an object with a name")
            if set(o) - _OUTPUT_KEYS:
                raise _invalid(f"unknown field(s) of outputs[{i}]")
            op = _params(o, f"outputs[{i}]")
            if "classification" in op:
                raise ServiceError(422, "unsupported_parameter", "the classification extension is not supported; "
                                                                 "outputs are probabilities per label")
            if set(op) - {"binary_data"}:
                raise ServiceError(422, "unsupported_parameter", "the only output parameter is binary_data")
            flag = v2_binary.flag(op, "binary_data")
            if flag is not None:
                binary[o["name"]] = flag
            tasks.append(o["name"])
    return V2Request(id=rid, tasks=tasks, binary=binary, binary_all=bool(v2_binary.flag(params, "binary_data_output")),
                     strict=v2_binary.flag(params, "strict"), shape=shape, values=values,
                     may_have_bools=data is not None and (b"true" in head or b"false" in head))
