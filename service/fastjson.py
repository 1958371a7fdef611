"""JSON on the hot path: orjson when installed (a pinned dependency), the standard library otherwise.

orjson is strict JSON: it refuses ``NaN``/``Infinity`` literals, integers beyond 64 bits and nesting
deeper than 1024. Python's ``json`` accepts the first two, so a body orjson refuses is read again
with ``json.loads`` before it is called malformed: ``{"inputs": [NaN]}`` stays a 422 ``bad_tensor``
(a value the server refuses, with that reason), not ``malformed_json``.
"""

from __future__ import annotations

import json
from typing import Any

from service.errors import ServiceError

try:  # pragma: no cover - exercised by whichever is installed
    import orjson

    _OPTS = orjson.OPT_SERIALIZE_NUMPY

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=_OPTS)

    def _fast_loads(data: bytes) -> Any:
        return orjson.loads(data)

    _FAST_ERRORS: tuple[type[BaseException], ...] = (orjson.JSONDecodeError,)
    ENCODER = "orjson " + orjson.__version__
    NUMPY = True  # numpy arrays may be handed to dumps as they are
except ImportError:  # pragma: no cover
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _fast_loads = json.loads  # type: ignore[assignment]
    _FAST_ERRORS = (ValueError, RecursionError)
    ENCODER = "json"
    NUMPY = False


def loads(data: bytes) -> Any:
    """Parse a request body; 422 ``malformed_json`` (never quoting more than 200 chars of the reason)."""
    try:
        return _fast_loads(data)
    except _FAST_ERRORS:
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ServiceError(422, "malformed_json", f"the body is not valid JSON: {str(e)[:200]}") from e
