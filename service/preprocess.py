"""Request bodies -> the network's input tensor, exactly as the manifest's preprocessing says.

Every way a body can be wrong ends in a ``ServiceError`` with its 4xx status; nothing here raises
anything else for bad input (decoders' own exceptions are translated at this boundary).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import math
import struct
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from mobile_export.manifest import Manifest
from service import fastjson
from service.errors import ServiceError

T = TypeVar("T")

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
FORMATS = ("PNG", "JPEG", "MPO")  # MPO: a JPEG with an MPF segment (phone cameras); its first frame is read
ABS_MAX_IMAGE_PIXELS = 4096 * 4096  # never decode more, whatever the model's input
MIN_IMAGE_PIXELS_LIMIT = 1024 * 1024  # a small model still accepts a 1-megapixel photo
IMAGE_PIXEL_FACTOR = 256  # by default: up to 256x the model's input pixels (16x per side)
JSON_BYTES_PER_VALUE = 64  # generous text per number ("-1.2345678901234567e-05, " is 25)
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed/decoded on the decode threads

_decode_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="pam-decode")


def image_pixel_limit(manifest: Manifest, configured: int | None = None) -> int:
    """Largest declared width x height decoded for this model (checked before any pixel is decoded)."""
    if configured is not None:
        return configured
    h, w = manifest.preprocessing.size
    return min(ABS_MAX_IMAGE_PIXELS, max(MIN_IMAGE_PIXELS_LIMIT, IMAGE_PIXEL_FACTOR * h * w))


def json_body_limit(manifest: Manifest, max_body_bytes: int) -> int:
    """Largest JSON tensor body worth parsing: ``max_batch`` inputs at a generous size per number."""
    values = manifest.input.max_batch * math.prod(manifest.input.shape)
    return min(max_body_bytes, max(OFF_LOOP_BYTES, JSON_BYTES_PER_VALUE * values + 4096))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only and check the declared size: no pixel is decoded here."""
    if not data:
        raise ServiceError(400, "empty_image", "the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])  # JPEG opens MPO too
    except UnidentifiedImageError as e:
        raise ServiceError(415, "unsupported_image", "not a PNG or JPEG image") from e
    except Image.DecompressionBombError as e:
        raise ServiceError(400, "image_too_large", f"the image declares too many pixels ({e}); "
                                                   f"at most {max_pixels}") from e
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
        raise ServiceError(400, "bad_image", f"cannot read the image: {e}") from e
    if img.format not in FORMATS:
        raise ServiceError(415, "unsupported_image", f"image format {img.format} is not accepted; send PNG or JPEG")
    w, h = img.size
    if w < 1 or h < 1:
        raise ServiceError(400, "bad_image", f"image of {w}x{h} pixels is empty")
    if w * h > max_pixels:
        raise ServiceError(400, "image_too_large",
                           f"image declares {w}x{h} = {w * h} pixels; this model accepts at most {max_pixels} "
                           f"(refused before decoding)")
    return img


def _decode_opened(img: Image.Image, manifest: Manifest) -> np.ndarray:
    pre = manifest.preprocessing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # truncated or corrupt data fails here, not later
            resized = img.convert(pre.channel_order).resize((pre.size[1], pre.size[0]), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, struct.error, EOFError, Image.DecompressionBombError) as e:
        raise ServiceError(400, "bad_image", f"cannot decode the image: {e}") from e
    finally:
        img.close()
    arr: np.ndarray = np.asarray(resized, dtype=np.float32) * np.float32(pre.scale)
    arr = arr[:, :, None] if arr.ndim == 2 else arr  # HW -> HWC
    if pre.invert:
        arr = np.float32(1.0) - arr
    arr = (arr - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None], dtype=np.float32)


def decode_image(data: bytes, manifest: Manifest, max_pixels: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> (1, C, H, W) float32 network input (blocking)."""
    img = open_image(data, image_pixel_limit(manifest, max_pixels))
    return _decode_opened(img, manifest)


async def decode_image_async(data: bytes, manifest: Manifest, max_pixels: int | None = None,
                             inline_pixels: int = 0) -> np.ndarray:
    """Check the declared size on the loop, then decode on the decode threads (inline only for images
    of at most ``inline_pixels`` pixels in a small body, where a thread hand-off costs more than it)."""
    img = open_image(data, image_pixel_limit(manifest, max_pixels))
    w, h = img.size
    if w * h <= inline_pixels and len(data) <= OFF_LOOP_BYTES:
        return _decode_opened(img, manifest)
    return await asyncio.get_running_loop().run_in_executor(_decode_pool, _decode_opened, img, manifest)


async def off_loop(fn: Callable[..., T], *args: Any, size: int) -> T:
    """``fn(*args)`` on the decode threads when ``size`` (bytes of input) is large, else inline."""
    if size <= OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_decode_pool, fn, *args)


def parse_object(data: bytes, allowed: frozenset[str] | set[str], error: Callable[[str], Exception]) -> dict[str, Any]:
    """A JSON object with no field outside ``allowed``; anything else raises ``error(reason)``."""
    payload = parse_json(data)
    if not isinstance(payload, dict):
        raise error(f"the body is a JSON {type(payload).__name__}, not an object")
    extra = set(payload) - set(allowed)
    if extra:
        raise error(f"unknown field(s) {', '.join(sorted(map(str, extra)))[:100]}")
    return payload


def parse_json(data: bytes) -> Any:
    return fastjson.loads(data)


_TENSOR_KEYS = frozenset(("inputs", "dtype"))
# Tensor values are the network's preprocessed input (pixels normalised to a few units). Bounded so that
# a finite input cannot overflow the network into Inf/NaN scores (float32 max in every value did: the
# response then held null scores); the OpenAPI schema states the same bound (service/openapi_doc.py).
MAX_INPUT_ABS = 1e6


def _bad_request(why: str) -> ServiceError:
    return ServiceError(422, "invalid_tensor_request", f"expected {{'inputs': [...], 'dtype': 'float32'}}: {why}")


def tensor_from_json(data: bytes, manifest: Manifest) -> np.ndarray:
    """A ``TensorRequest`` body -> (N, C, H, W) float32, checked against the manifest's input (by hand:
    a pydantic model over a tensor's values cost more than parsing them)."""
    payload = parse_object(data, _TENSOR_KEYS, _bad_request)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad_request("inputs must be a non-empty list")
    if payload.get("dtype", "float32") != "float32":
        raise _bad_request("dtype must be 'float32'")
    return check_tensor(inputs, manifest, None, b"true" in data or b"false" in data)


def contains_bool(values: Any) -> bool:
    """Whether nested lists hold a JSON boolean (numpy would read ``true`` among floats as 1.0)."""
    stack = [values]
    while stack:
        v = stack.pop()
        if type(v) is list:
            stack.extend(v)
        elif type(v) is bool:
            return True
    return False


def check_tensor(values: Any, manifest: Manifest, shape: list[int] | None = None,
                 may_have_bools: bool = True) -> np.ndarray:
    """Nested lists (or a flat list with ``shape``) -> (N, C, H, W) float32, or a 4xx saying why.
    ``may_have_bools=False`` skips the walk for booleans (the body had no ``true``/``false`` token)."""
    want = list(manifest.input.shape)
    try:
        arr = np.asarray(values)
    except (ValueError, RecursionError) as e:  # ragged nesting
        raise ServiceError(422, "bad_tensor", f"inputs are not a rectangular array: {str(e)[:200]}") from e
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise ServiceError(422, "bad_dtype", f"inputs must be numbers (float32), got {arr.dtype.name} values")
    if may_have_bools and not isinstance(values, np.ndarray) and contains_bool(values):
        raise ServiceError(422, "bad_dtype", "inputs must be numbers (float32); JSON booleans are not numbers")
    if shape is not None:
        if any((not isinstance(s, int)) or isinstance(s, bool) or s < 0 for s in shape) \
                or math.prod(shape) != arr.size:
            raise ServiceError(422, "bad_shape", f"shape {str(shape)[:100]} does not hold {arr.size} values")
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
    # on the values as sent (float64 from JSON), so the bound is exactly the schema's; NaN fails both tests
    if arr.size and not (arr.max() <= MAX_INPUT_ABS and arr.min() >= -MAX_INPUT_ABS):
        raise ServiceError(422, "bad_tensor", f"inputs must be finite numbers within +-{MAX_INPUT_ABS:g} (the "
                                              f"network's preprocessed input; no NaN, no Infinity)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def scores_of(kind: str, logits: np.ndarray) -> np.ndarray:
    """Logits (N, K) -> probabilities: softmax over classes, or one sigmoid per attribute."""
    z = logits.astype(np.float64)
    if kind == "classes":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
    return 1.0 / (1.0 + np.exp(-z))


def finite_scores(kind: str, logits: np.ndarray, task_name: str) -> np.ndarray:
    """The task's probabilities, or a 422 when the network's output is not finite (never null scores)."""
    probs = scores_of(kind, logits)
    if not np.isfinite(probs).all():
        raise ServiceError(422, "non_finite_output", f"the network's output for task {task_name!r} is not finite "
                                                     f"on this input (Inf/NaN); send preprocessed inputs")
    return probs
