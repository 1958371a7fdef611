"""Request bodies -> the network's input tensor, exactly as the manifest's preprocessing says.

Every way a body can be wrong ends in a ``ServiceError`` with its 4xx status; nothing here raises
anything else for bad input (decoders' own exceptions are translated at this boundary).
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from mobile_export.manifest import Manifest
from service.errors import ServiceError
from service.schemas import TensorRequest

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
MAX_IMAGE_PIXELS = 4096 * 4096  # refuse decompression bombs before decoding a single row


def decode_image(data: bytes, manifest: Manifest) -> np.ndarray:
    """PNG/JPEG bytes -> (1, C, H, W) float32 network input."""
    if not data:
        raise ServiceError(400, "empty_image", "the image is empty")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ServiceError(415, "unsupported_image", "not a PNG or JPEG image") from e
    except (OSError, ValueError) as e:
        raise ServiceError(400, "bad_image", f"cannot read the image: {e}") from e
    if img.format not in ("PNG", "JPEG"):
        raise ServiceError(415, "unsupported_image", f"image format {img.format} is not accepted; send PNG or JPEG")
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
        raise ServiceError(400, "bad_image", f"image of {w}x{h} pixels is outside 1..{MAX_IMAGE_PIXELS} pixels")
    pre = manifest.preprocessing
    try:
        img.load()  # truncated or corrupt data fails here, not later
        resized = img.convert(pre.channel_order).resize((pre.size[1], pre.size[0]), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ServiceError(400, "bad_image", f"cannot decode the image: {e}") from e
    arr: np.ndarray = np.asarray(resized, dtype=np.float32) * np.float32(pre.scale)
    arr = arr[:, :, None] if arr.ndim == 2 else arr  # HW -> HWC
    if pre.invert:
        arr = np.float32(1.0) - arr
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None], dtype=np.float32)


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ServiceError(422, "malformed_json", f"the body is not valid JSON: {str(e)[:200]}") from e


def tensor_from_json(data: bytes, manifest: Manifest) -> np.ndarray:
    """A ``TensorRequest`` body -> (N, C, H, W) float32, checked against the manifest's input."""
    payload = parse_json(data)
    try:
        req = TensorRequest.model_validate(payload)
    except (ValidationError, RecursionError) as e:
        msg = "; ".join(f"{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors()[:3]) \
            if isinstance(e, ValidationError) else "nested too deeply"
        raise ServiceError(422, "invalid_tensor_request",
                           f"expected {{'inputs': [...], 'dtype': 'float32'}}: {msg}") from e
    return check_tensor(req.inputs, manifest)


def check_tensor(values: Any, manifest: Manifest, shape: list[int] | None = None) -> np.ndarray:
    """Nested lists (or a flat list with ``shape``) -> (N, C, H, W) float32, or a 422 saying why."""
    want = list(manifest.input.shape)
    try:
        arr = np.asarray(values)
    except (ValueError, RecursionError) as e:  # ragged nesting
        raise ServiceError(422, "bad_tensor", f"inputs are not a rectangular array: {str(e)[:200]}") from e
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise ServiceError(422, "bad_dtype", f"inputs must be numbers (float32), got {arr.dtype.name} values")
    if shape is not None:
        if any((not isinstance(s, int)) or s < 0 for s in shape) or math.prod(shape) != arr.size:
            raise ServiceError(422, "bad_shape", f"shape {shape} does not hold {arr.size} values")
        arr = arr.reshape(shape)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or list(arr.shape[1:]) != want:
        raise ServiceError(422, "bad_shape",
                           f"input shape {list(arr.shape)} is not (C,H,W)={want} or (N,{','.join(map(str, want))})")
    n = arr.shape[0]
    if n < 1 or n > manifest.input.max_batch:
        raise ServiceError(422, "bad_batch",
                           f"batch of {n} is outside 1..{manifest.input.max_batch} (the manifest's maximum)")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ServiceError(422, "bad_tensor", "inputs must be finite float32 values")
    return np.ascontiguousarray(out)


def scores_of(kind: str, logits: np.ndarray) -> np.ndarray:
    """Logits (N, K) -> probabilities: softmax over classes, or one sigmoid per attribute."""
    z = logits.astype(np.float64)
    if kind == "classes":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-z))
