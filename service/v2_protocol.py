"""The KServe V2 (Open Inference Protocol) logic, beside the native endpoint's (``hotpath.py``): which
model a path names, the metadata, configuration and statistics documents, the infer request checked
by hand and the infer response's outputs. ``api/routes/v2.py`` only routes to these; ``hotpath.py``
runs the infer route with them.

``outputs`` in an infer request selects the tasks (the method of their combination runs, or its
cheapest exported superset); the output tensors are per-task probabilities (softmax for classes,
sigmoid for attributes), (N, K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service import fastjson, preprocess, v2_binary
from service.batching import Execution
from service.errors import ServiceError
from service.model_loading import LoadedModel
from service.runtime_pool import RuntimePool
from service.schemas import V2ModelMetadata, V2ServerMetadata, V2TensorMeta

INPUT_NAME = "input"
SERVER_NAME = "pam-mobile"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics"]
_REQUEST_KEYS = frozenset(("id", "parameters", "inputs", "outputs"))
_INPUT_KEYS = frozenset(("name", "shape", "datatype", "data", "parameters"))
_OUTPUT_KEYS = frozenset(("name", "parameters"))


# ------------------------------------------------------------------------------ models and documents
def infer_target(path: str) -> tuple[str, str | None] | None:
    """``/v2/models/{name}/infer`` or ``/v2/models/{name}/versions/{version}/infer`` -> (name, version)."""
    parts = path[len("/v2/models/") : -len("/infer")].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


def model_named(pool: RuntimePool, name: str, version: str | None = None) -> LoadedModel:
    """The loaded model if it is the one named (503 while loading, 404 for another name or version)."""
    model = pool.current()
    m = model.manifest
    if name != m.model_name:
        raise ServiceError(404, "unknown_model", f"model {name!r} is not loaded; loaded: {m.model_name!r}")
    if version not in (None, "", m.model_version):
        raise ServiceError(
            404, "unknown_model", f"model {name!r} has no version {version!r}; loaded: {m.model_version!r}"
        )
    return model


def server_metadata() -> V2ServerMetadata:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("pam-mobile")
    except PackageNotFoundError:  # running from a source tree
        v = "0"
    return V2ServerMetadata(name=SERVER_NAME, version=v, extensions=EXTENSIONS)


def model_metadata(model: LoadedModel) -> V2ModelMetadata:
    m = model.manifest
    return V2ModelMetadata(
        name=m.model_name,
        versions=[m.model_version],
        platform="executorch",
        inputs=[V2TensorMeta(name=INPUT_NAME, datatype="FP32", shape=[-1, *m.input.shape])],
        outputs=[V2TensorMeta(name=t.name, datatype="FP32", shape=[-1, len(t.labels)]) for t in m.tasks],
    )


def model_config(model: LoadedModel, pool: RuntimePool) -> dict[str, Any]:
    """Triton's model configuration, with the methods (one per exported combination) as an extra field."""
    m = model.manifest
    s = pool.settings
    cfg: dict[str, Any] = {
        "name": m.model_name,
        "platform": "executorch",
        "backend": "executorch",
        "version_policy": {"latest": {}},
        "max_batch_size": m.input.max_batch,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": m.input.shape}],
        "output": [
            {"name": t.name, "data_type": "TYPE_FP32", "dims": [len(t.labels)], "label_filename": ""} for t in m.tasks
        ],
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
        "parameters": {"strict_combinations": {"string_value": str(s.strict_combinations).lower()}},
        "methods": [{"name": e.name, "tasks": e.tasks, "macs": e.macs, "params": e.params} for e in m.methods],
    }
    if s.batching:
        cfg["dynamic_batching"] = {
            "max_queue_delay_microseconds": s.batch_window_us,
            "preferred_batch_size": [pool.batch_limit(model)],
        }
    return cfg


def model_stats(model: LoadedModel, pool: RuntimePool) -> dict[str, Any]:
    """Triton's statistics extension: request counts and durations, executes, executes per batch size."""
    m = model.manifest
    return {"model_stats": [pool.stats.model_stats(m.model_name, m.model_version, [e.name for e in m.methods])]}


# ------------------------------------------------------------------------------ the infer request
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


class _Tensor:
    """The fields of ``inputs[0]`` that ``v2_binary.input_values`` reads."""

    def __init__(self, name: str, shape: list[int], datatype: str, data: Any, parameters: dict[str, Any]) -> None:
        self.name, self.shape, self.datatype, self.data, self.parameters = name, shape, datatype, data, parameters


def _input_tensor(payload: dict[str, Any], manifest: Any) -> _Tensor:
    """``inputs``: exactly one FP32 tensor named ``input`` of shape (N, C, H, W)."""
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
        raise ServiceError(
            400, "unknown_input", f"model {manifest.model_name!r} has one input, {INPUT_NAME!r}; got {name[:60]!r}"
        )
    if datatype != "FP32":
        raise ServiceError(422, "bad_dtype", f"input datatype must be FP32, got {datatype[:20]}")
    if len(shape) != 4 or any(type(d) is not int or d < 0 for d in shape):
        raise ServiceError(
            422,
            "bad_shape",
            f"shape must be [N, {', '.join(map(str, manifest.input.shape))}] (integers), got {str(shape)[:80]}",
        )
    in_params = _params(tensor, "inputs[0]")
    if set(in_params) - {"binary_data_size"}:
        raise ServiceError(422, "unsupported_parameter", "the only input parameter is binary_data_size")
    data = tensor.get("data")
    if "data" in tensor and not isinstance(data, list):
        raise _invalid("inputs[0].data must be a list of numbers")
    return _Tensor(name, shape, datatype, data, in_params)


def _requested_outputs(payload: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool]]:
    """``outputs``: the tasks asked for (None: all) and, per task, its ``binary_data`` flag when given."""
    if "outputs" not in payload:
        return None, {}
    outputs = payload.get("outputs")
    if not isinstance(outputs, list):
        raise _invalid("outputs must be a list")
    if not outputs:
        raise ServiceError(
            400, "empty_combination", "outputs is empty: name at least one output (task), or omit outputs for all tasks"
        )
    tasks: list[str] = []
    binary: dict[str, bool] = {}
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise _invalid(f"outputs[{i}] must be an object with a name")
        if set(o) - _OUTPUT_KEYS:
            raise _invalid(f"unknown field(s) of outputs[{i}]")
        op = _params(o, f"outputs[{i}]")
        if "classification" in op:
            raise ServiceError(
                422,
                "unsupported_parameter",
                "the classification extension is not supported; outputs are probabilities per label",
            )
        if set(op) - {"binary_data"}:
            raise ServiceError(422, "unsupported_parameter", "the only output parameter is binary_data")
        flag = v2_binary.flag(op, "binary_data")
        if flag is not None:
            binary[o["name"]] = flag
        tasks.append(o["name"])
    return tasks, binary


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
    tensor = _input_tensor(payload, manifest)
    values, used = v2_binary.input_values(tensor, tail, 0)
    if used != len(tail):
        raise ServiceError(422, "bad_binary_size", f"{len(tail) - used} bytes of binary data belong to no input")
    tasks, binary = _requested_outputs(payload)
    return V2Request(
        id=rid,
        tasks=tasks,
        binary=binary,
        binary_all=bool(v2_binary.flag(params, "binary_data_output")),
        strict=v2_binary.flag(params, "strict"),
        shape=tensor.shape,
        values=values,
        may_have_bools=tensor.data is not None and (b"true" in head or b"false" in head),
    )


# ------------------------------------------------------------------------------ the infer response
def infer_outputs(
    model: LoadedModel, req: V2Request, tasks: list[str], ex: Execution
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The response's output tensors, in the order asked (all ``tasks`` when none were named), and the
    raw bytes of those asked for in binary, in the same order."""
    by_task = dict(zip(ex.tasks, ex.outputs, strict=True))
    outputs: list[dict[str, Any]] = []
    binaries: list[bytes] = []
    order = list(dict.fromkeys(req.tasks)) if req.tasks else tasks
    for task_name in order:
        kind, _labels = model.task_info[task_name]
        probs = preprocess.finite_scores(kind, by_task[task_name], task_name).astype("<f4")
        entry: dict[str, Any] = {"name": task_name, "shape": list(probs.shape), "datatype": "FP32"}
        binary = req.binary.get(task_name)
        if binary if binary is not None else req.binary_all:
            raw = probs.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binaries.append(raw)
        else:
            entry["data"] = probs.reshape(-1) if fastjson.NUMPY else probs.reshape(-1).tolist()
        outputs.append(entry)
    return outputs, binaries
