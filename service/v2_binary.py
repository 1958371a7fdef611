"""The KServe V2 / Triton binary tensor data extension, both directions.

Request: ``Inference-Header-Content-Length: N``; the first N bytes of the body are the JSON header,
the rest the raw little-endian tensors of the inputs that carry ``parameters.binary_data_size``,
in input order. Response: outputs asked for in binary (``parameters.binary_data`` on the output,
or ``binary_data_output`` on the request) carry ``binary_data_size`` and no ``data``; their bytes
follow the JSON header, whose length the ``Inference-Header-Content-Length`` header gives.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from service import fastjson
from service.errors import ServiceError

HEADER = "inference-header-content-length"
DTYPES = {"FP32": np.dtype("<f4")}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of a request body."""
    if header_length is None:
        return body, b""
    hl = header_length.strip()
    if not hl.isdigit() or int(hl) > len(body):
        raise ServiceError(400, "bad_binary_header",
                           f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the "
                           f"body of {len(body)} bytes")
    n = int(hl)
    return body[:n], body[n:]


def flag(params: dict[str, object] | None, key: str) -> bool | None:
    """A boolean parameter (None when absent), or a 422 when it is not a boolean."""
    if not params or key not in params:
        return None
    v = params[key]
    if not isinstance(v, bool):
        raise ServiceError(422, "bad_parameter", f"parameter {key} must be a boolean, got {json.dumps(v)[:40]}")
    return v


def input_values(tensor: Any, tail: bytes, offset: int) -> tuple[Any, int]:
    """The input's values (nested list or a flat float32 array) and the offset after its binary part."""
    params = tensor.parameters or {}
    size = params.get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise ServiceError(422, "bad_inputs", f"input {tensor.name!r} has neither data nor binary_data_size")
        return tensor.data, offset
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ServiceError(422, "bad_binary_size", f"binary_data_size must be a non-negative integer, got {size!r}")
    if tensor.data is not None:
        raise ServiceError(422, "bad_inputs", f"input {tensor.name!r} has both data and binary_data_size")
    if any((not isinstance(s, int)) or s < 0 for s in tensor.shape):
        raise ServiceError(422, "bad_shape", f"shape {tensor.shape} is not a list of non-negative integers")
    dtype = DTYPES[tensor.datatype]
    want = math.prod(tensor.shape) * dtype.itemsize
    if size != want:
        raise ServiceError(422, "bad_binary_size",
                           f"binary_data_size {size} does not match shape {tensor.shape} of {tensor.datatype} "
                           f"({want} bytes)")
    if offset + size > len(tail):
        raise ServiceError(422, "bad_binary_size",
                           f"binary data ends at byte {len(tail)}; input {tensor.name!r} needs {offset + size}")
    return np.frombuffer(tail, dtype=dtype, count=size // dtype.itemsize, offset=offset), offset + size


def encode_response(header: dict[str, Any], binaries: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: plain JSON, or JSON header + binary tail."""
    raw = fastjson.dumps(header)
    if not binaries:
        return raw, {"content-type": "application/json"}
    return raw + b"".join(binaries), {"content-type": "application/octet-stream", HEADER: str(len(raw))}
