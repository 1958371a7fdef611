"""The OpenAPI operations of the two plain-ASGI inference routes, with request schemas exactly as strict
as the server: a request the schema calls valid is answered 200 (or 404/503 for reasons a schema cannot
know), and one it calls invalid gets a 4xx.

The tensor schemas are built from the served manifest (input shape, ``max_batch``, task names), so
``{"inputs": [null]}``, a wrong shape or a batch above the maximum is already invalid in the schema.
Image bodies (PNG/JPEG, raw or multipart) are accepted too but are described in the operation's
text and ``x-image-bodies`` rather than as ``format: binary`` bodies: no schema can say which bytes
are a decodable image, and a generated client would take random bytes for a valid request.
"""

from __future__ import annotations

from typing import Any

from service import v2_binary
from service.preprocess import MAX_INPUT_ABS


def _number() -> dict[str, Any]:
    return {"type": "number", "minimum": -MAX_INPUT_ABS, "maximum": MAX_INPUT_ABS}


def _nested(shape: list[int]) -> dict[str, Any]:
    schema: dict[str, Any] = _number()
    for n in reversed(shape):
        schema = {"type": "array", "items": schema, "minItems": n, "maxItems": n}
    return schema


def tensor_request_schema(manifest: Any | None) -> dict[str, Any]:
    if manifest is None:
        value: dict[str, Any] = {"type": "array", "minItems": 1}
    else:
        shape, nmax = list(manifest.input.shape), manifest.input.max_batch
        batch = _nested(shape)
        value = {"anyOf": [_nested(shape),
                           {"type": "array", "items": batch, "minItems": 1, "maxItems": nmax}]}
    return {"title": "TensorRequest", "type": "object", "additionalProperties": False, "required": ["inputs"],
            "description": "one image (C, H, W) or a batch (N, C, H, W), N <= max_batch, already preprocessed "
                           "(the network's input); finite numbers within "
                           f"+-{MAX_INPUT_ABS:g}",
            "properties": {"inputs": value, "dtype": {"type": "string", "enum": ["float32"], "default": "float32"}}}


def _tasks_pattern(manifest: Any | None) -> str:
    if manifest is None:
        return r"^[^,+\s]+([,+ ][^,+\s]+){0,7}$"
    names = "|".join(sorted(manifest.task_names))
    return rf"^({names})([,+ ]({names})){{0,7}}$"


def v2_request_schema(manifest: Any | None) -> dict[str, Any]:
    inp: dict[str, Any] = {"type": "object", "additionalProperties": False,
                           "required": ["name", "shape", "datatype", "data"],
                           "properties": {"name": {"type": "string", "enum": ["input"]},
                                          "datatype": {"type": "string", "enum": ["FP32"]},
                                          "parameters": {"type": "object", "additionalProperties": False}}}
    if manifest is None:
        inp["properties"].update(shape={"type": "array", "items": {"type": "integer", "minimum": 0}},
                                 data={"type": "array", "items": _number()})
        input_schema: dict[str, Any] = inp
    else:
        shape, nmax = list(manifest.input.shape), manifest.input.max_batch
        size = 1
        for d in shape:
            size *= d
        variants = []
        for n in range(1, nmax + 1):
            v = {**inp, "properties": {**inp["properties"],
                                       "shape": {"type": "array", "items": {"type": "integer"},
                                                 "prefixItems": [{"const": d} for d in (n, *shape)],
                                                 "minItems": 4, "maxItems": 4},
                                       "data": {"type": "array", "items": _number(), "minItems": n * size,
                                                "maxItems": n * size}}}
            variants.append(v)
        input_schema = {"oneOf": variants}
    output = {"type": "object", "additionalProperties": False, "required": ["name"],
              "properties": {"name": {"type": "string", **({"enum": list(manifest.task_names)} if manifest else {})},
                             "parameters": {"type": "object", "additionalProperties": False,
                                            "properties": {"binary_data": {"type": "boolean"}}}}}
    return {"title": "V2InferRequest", "type": "object", "additionalProperties": False, "required": ["inputs"],
            "description": "KServe V2: one FP32 input 'input' of shape [N, C, H, W] with N*C*H*W values; outputs "
                           "name the tasks (omitted: all). The binary tensor data extension (an "
                           "Inference-Header-Content-Length header, raw little-endian FP32 after the JSON) is "
                           "accepted too (see x-binary-tensor-data).",
            "properties": {"id": {"type": "string"},
                           "parameters": {"type": "object",
                                          "properties": {"binary_data_output": {"type": "boolean"},
                                                         "strict": {"type": "boolean"}}},
                           "inputs": {"type": "array", "items": input_schema, "minItems": 1, "maxItems": 1},
                           "outputs": {"type": "array", "items": output, "minItems": 1}}}


def _responses(ok_ref: str, errors: dict[int | str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"200": {"description": "Successful Response",
                                   "content": {"application/json": {"schema": {"$ref": ok_ref}}}}}
    for code, spec in errors.items():
        out[str(code)] = {"description": spec["description"],
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    return out


def _v2_responses(errors: dict[int | str, dict[str, Any]]) -> dict[str, Any]:
    """As ``_responses``, plus the binary tensor data answer: when an output asks for ``binary_data`` (or
    the request for ``binary_data_output``), the body is the JSON header then the raw FP32 outputs, sent
    as ``application/octet-stream`` with ``Inference-Header-Content-Length`` = the JSON's length."""
    out = _responses("#/components/schemas/V2InferResponse", errors)
    ok = out["200"]
    ok["description"] = ("Successful Response: JSON, or with binary outputs the JSON header followed by the raw "
                         "little-endian FP32 outputs (application/octet-stream)")
    ok["content"]["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    ok["headers"] = {v2_binary.HEADER: {
        "description": "length of the JSON header at the start of an application/octet-stream body",
        "required": False, "schema": {"type": "integer", "minimum": 0}}}
    return out


def add_hot_routes(schema: dict[str, Any], manifest: Any | None, errors: dict[int | str, dict[str, Any]]) -> None:
    """Add ``POST /infer`` and the V2 infer operations, with their components, to ``schema``."""
    from service.schemas import ErrorResponse, InferResponse, V2InferResponse

    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorResponse, InferResponse, V2InferResponse):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(js.pop("$defs", {}))
        comps[model.__name__] = js
    comps["TensorRequest"] = tensor_request_schema(manifest)
    comps["V2InferRequest"] = v2_request_schema(manifest)
    tasks_items = {"type": "string", "pattern": _tasks_pattern(manifest)}
    paths = schema.setdefault("paths", {})
    paths["/infer"] = {"post": {
        "tags": ["inference"], "operationId": "infer", "summary": "Infer",
        "description": "Run only the method of the requested combination on a JSON tensor, or on an image "
                       "(PNG/JPEG: a raw image/png or image/jpeg body, or multipart/form-data with a file part "
                       "'image'); a combination without its own method runs its cheapest exported superset, "
                       "extra outputs dropped.",
        "x-image-bodies": ["image/png", "image/jpeg", "multipart/form-data (field 'image')"],
        "parameters": [
            {"name": "tasks", "in": "query", "required": False, "style": "form", "explode": True,
             "description": "tasks separated by ',', ' ' or '+' (may be repeated: tasks=a&tasks=b), any order; "
                            "omitted: all tasks",
             "schema": {"type": "array", "items": tasks_items, "minItems": 1, "maxItems": 8}},
            {"name": "strict", "in": "query", "required": False,
             "description": "true: 404 for a combination without its own method (default: "
                            "PAM_STRICT_COMBINATIONS) instead of a superset method",
             "schema": {"type": "boolean"}}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/TensorRequest"}}}},
        "responses": _responses("#/components/schemas/InferResponse", errors)}}
    v2_op = {
        "tags": ["kserve-v2"], "summary": "V2 Infer",
        "x-binary-tensor-data": "Inference-Header-Content-Length: N; the first N bytes are the JSON request, "
                                "the rest the raw little-endian FP32 input (parameters.binary_data_size bytes)",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}}}},
        "responses": _v2_responses(errors)}
    name_enum = {"enum": [manifest.model_name]} if manifest else {}
    version_enum = {"enum": [manifest.model_version]} if manifest else {}
    name_p = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", **name_enum}}
    version_p = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", **version_enum}}
    paths["/v2/models/{name}/infer"] = {"post": {**v2_op, "operationId": "v2_infer", "parameters": [name_p]}}
    paths["/v2/models/{name}/versions/{version}/infer"] = {
        "post": {**v2_op, "operationId": "v2_infer_version", "parameters": [name_p, version_p]}}
