"""The ``bare`` variant of ``pam bench-serve``: uvicorn + the same decode and the same runtime
call as ``POST /infer``, and nothing else (no framework, no middleware, no metrics, no log line).

It is the Python HTTP limit on this machine against which the service's overhead is judged; it
is a benchmark instrument, not a server to deploy (no limits, no error handling beyond 400).

    python -m pam_app.bench.serve_bare BUNDLE_DIR --port 8001
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np


def make_app(bundle_dir: Path) -> Any:
    import torch

    from mobile_export.runtime import BundleRuntime
    from service.preprocess import decode_image, scores_of, tensor_from_json

    runtime = BundleRuntime(bundle_dir)
    manifest = runtime.manifest
    kinds = {t.name: t.kind for t in manifest.tasks}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        if scope["path"] == "/v2/health/ready":
            await _send(send, 200, b'{"ready":true}')
            return
        t0 = time.perf_counter()
        try:
            q = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
            method = manifest.method_for(",".join(q.get("tasks", [])) or None)
            ctype = dict(scope["headers"]).get(b"content-type", b"")
            x = tensor_from_json(body, manifest) if ctype.startswith(b"application/json") else \
                decode_image(body, manifest)
            t1 = time.perf_counter()
            outs = runtime.run(method.name, torch.from_numpy(x))
            t2 = time.perf_counter()
        except Exception as e:  # a benchmark instrument: any failure is a 400 with the reason
            await _send(send, 400, json.dumps({"error": str(e)[:200]}).encode())
            return
        preds = [{task: scores_of(kinds[task], o.numpy())[i].tolist() for task, o in zip(method.tasks, outs,
                                                                                       strict=True)}
                 for i in range(int(x.shape[0]))]
        await _send(send, 200, json.dumps({"method": method.name, "predictions": preds, "timings_ms": {
            "preprocess": (t1 - t0) * 1e3, "execute": (t2 - t1) * 1e3}}).encode())

    return app


async def _send(send: Any, status: int, raw: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("bundle_dir")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    from mobile_export.runtime import set_threads

    set_threads(a.threads)
    np.zeros(1)
    uvicorn.run(make_app(Path(a.bundle_dir)), host="127.0.0.1", port=a.port, log_level="warning",
                access_log=False, http="httptools", loop="uvloop")


if __name__ == "__main__":
    main()
