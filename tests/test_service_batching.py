"""Dynamic batching: concurrent requests for one method run as fewer executes, and every response
equals the unbatched answer for its own input."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import torch

from tests.service_support import app_serving, digit_images, digits_bundle, normalise, softmax


def test_eight_concurrent_requests_run_as_fewer_executes_with_their_own_answers() -> None:
    from mobile_export.runtime import BundleRuntime

    app = app_serving(digits_bundle(), batch_window_us=200_000)
    pool = app.state.pool
    xs = normalise(digit_images()[:8], digits_bundle())

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await asyncio.gather(*(c.post("/infer?tasks=digit,parity", json={"inputs": xs[i].tolist()})
                                          for i in range(8)))

    before = pool.executes
    rs = asyncio.run(burst())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    executes = pool.executes - before
    assert 2 <= executes < 8  # max_batch 4: at least two executes, far fewer than eight
    assert max(r.json()["executed_batch"] for r in rs) > 1 and all(r.json()["batch"] == 1 for r in rs)
    rt = BundleRuntime(digits_bundle())
    for i, r in enumerate(rs):
        ref = rt.run("digit+parity", torch.from_numpy(xs[i:i + 1]))  # unbatched, this request's own input
        got = r.json()["predictions"][0]
        for j, task in enumerate(["digit", "parity"]):
            np.testing.assert_allclose(list(got[task]["scores"].values()), softmax(ref[j].numpy())[0],
                                       rtol=1e-5, atol=1e-6)
        t = r.json()["timings_ms"]
        assert t["total"] >= t["queue"] + t["execute"] - 1e-3  # timings stay per request and consistent
    stats = pool.stats.model_stats("digits", "test-1", ["digit+parity"])["methods"][0]
    assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"] == executes
    assert stats["inference_count"] == 8
    pool.shutdown()


def test_without_a_window_requests_that_queue_while_the_runtime_is_busy_are_batched() -> None:
    from service.core.config import Settings
    from service.model_loading import load_bundle
    from service.runtime_pool import RuntimePool

    settings = Settings(probe=False)
    model = load_bundle(digits_bundle(), settings, probe=False)
    xs = normalise(digit_images()[:8], digits_bundle())

    async def run(pool: RuntimePool, busy_s: float) -> list:
        assert pool._executor is not None
        blocker = pool._executor.submit(time.sleep, busy_s)  # the runtime thread is busy meanwhile
        out = await asyncio.gather(*(pool.execute(model, "digit", xs[i:i + 1]) for i in range(8)))
        blocker.result()
        return out

    batched = RuntimePool(settings)
    got = asyncio.run(run(batched, 0.3))
    plain = RuntimePool(settings.model_copy(update={"batching": False}))
    ref = asyncio.run(run(plain, 0.0))
    assert plain.executes == 8 and batched.executes < 8
    assert max(e.batch_rows for e in got) == 4 and all(e.batch_rows == 1 for e in ref)
    for a, b in zip(got, ref, strict=True):
        assert a.outputs[0].shape == (1, 10)
        np.testing.assert_allclose(a.outputs[0], b.outputs[0], rtol=1e-5, atol=1e-6)
        assert a.queue_s >= 0 and a.execute_s > 0
    batched.shutdown()
    plain.shutdown()
