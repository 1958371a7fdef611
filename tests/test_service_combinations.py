"""A combination without its own method is answered by the cheapest exported superset (extra
outputs dropped, the response says which method ran), unless strict."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.service_support import (
    app_serving,
    digit_images,
    digits_bundle,
    normalise,
    softmax,
    without_methods,
)


def _post(app, url: str, **kw) -> httpx.Response:  # type: ignore[no-untyped-def]
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(url, **kw)

    return asyncio.run(go())


def test_a_superset_method_answers_exactly_the_tasks_asked_equal_to_the_exact_method(tmp_path: Path) -> None:
    from mobile_export.runtime import BundleRuntime

    trimmed = without_methods(tmp_path / "bundle", ("digit",))  # same program, `digit` no longer listed
    app = app_serving(trimmed)
    x = normalise(digit_images()[:4], digits_bundle())
    r = _post(app, "/infer?tasks=digit", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    # digit+parity (cheaper than all three tasks) ran; only `digit` is answered
    assert (body["combination"], body["method"], body["superset"]) == ("digit", "digit+parity", True)
    assert all(set(p) == {"digit"} for p in body["predictions"])
    exact = BundleRuntime(digits_bundle()).run("digit", torch.from_numpy(x))[0].numpy()  # the exact method
    got = np.array([list(p["digit"]["scores"].values()) for p in body["predictions"]])
    np.testing.assert_allclose(got, softmax(exact), rtol=0, atol=1e-5)
    # V2 too: only the requested output, the method that ran in the parameters
    req = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}],
           "outputs": [{"name": "digit"}]}
    v2 = _post(app, "/v2/models/digits/infer", json=req).json()
    assert [o["name"] for o in v2["outputs"]] == ["digit"] and v2["parameters"]["method"] == "digit+parity"
    np.testing.assert_allclose(np.array(v2["outputs"][0]["data"]).reshape(4, 10), softmax(exact), atol=1e-5)
    # strict: by query flag, by V2 parameter, by setting
    for resp in (_post(app, "/infer?tasks=digit&strict=true", json={"inputs": x.tolist()}),
                 _post(app, "/v2/models/digits/infer", json={**req, "parameters": {"strict": True}}),
                 _post(app_serving(trimmed, strict_combinations=True), "/infer?tasks=digit",
                       json={"inputs": x.tolist()})):
        assert resp.status_code == 404 and resp.json()["error"] == "combination_not_exported"
        assert "digit+parity" in resp.json()["exported_combinations"]
    # an exported combination still runs its own method
    own = _post(app, "/infer?tasks=parity,digit", json={"inputs": x.tolist()}).json()
    assert (own["method"], own["superset"]) == ("digit+parity", False)


def test_superset_choice_by_macs_else_fewest_tasks() -> None:
    from mobile_export.manifest import Manifest
    from service.combinations import resolve, smallest_superset
    from service.errors import ServiceError

    m = Manifest.load(digits_bundle())
    entries = {e.name: e for e in m.methods}
    # by MACs: make the three-task method the cheapest
    cheap = m.model_copy(update={"methods": [entries["digit+parity"].model_copy(update={"macs": 900}),
                                             entries["digit+loop+parity"].model_copy(update={"macs": 800})]})
    assert smallest_superset(cheap, ["parity"]).name == "digit+loop+parity"  # type: ignore[union-attr]
    # without MACs in the manifest: fewest tasks
    nomacs = m.model_copy(update={"methods": [e.model_copy(update={"macs": 0}) for e in m.methods]})
    assert smallest_superset(nomacs, ["parity"]).name == "digit+parity"  # type: ignore[union-attr]
    only_two = m.model_copy(update={"methods": [entries["digit+parity"]]})
    with pytest.raises(ServiceError) as e:
        resolve(only_two, ["loop"], strict=False)  # nothing covers loop
    assert e.value.status == 404 and e.value.code == "combination_not_exported"
