"""The service through a real `pam serve` (uvicorn) on loopback, against the real ExecuTorch runtime."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests.service_support import (
    MAX_BATCH,
    Server,
    digit_images,
    digits_bundle,
    digits_runtime,
    normalise,
    png_of,
    serve,
    softmax,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve(digits_bundle(), log, "--no-probe", "--max-body-bytes", "65536") as s:
        yield s


@pytest.fixture(scope="module")
def runtime():  # type: ignore[no-untyped-def]
    return digits_runtime()



def scores(resp: dict, task: str) -> np.ndarray:
    return np.array([[p[task]["scores"][k] for k in p[task]["scores"]] for p in resp["predictions"]])


def infer_json(server: Server, tasks: str | None, x: np.ndarray, **kw) -> httpx.Response:
    params = {} if tasks is None else {"tasks": tasks}
    return httpx.post(server.url + "/infer", params=params, json={"inputs": x.tolist()}, timeout=30, **kw)


def test_each_combination_runs_its_own_method_with_the_runtimes_outputs(server: Server, runtime) -> None:
    x = normalise(digit_images()[:3], server.bundle)
    one = infer_json(server, "digit", x).json()
    two = infer_json(server, "parity,digit,digit", x).json()  # order and duplicates normalised
    assert (one["method"], two["method"]) == ("digit", "digit+parity")
    assert one["combination"] == "digit" and set(one["predictions"][0]) == {"digit"}
    assert set(two["predictions"][0]) == {"digit", "parity"}
    assert two["macs"] > one["macs"] > 0 and one["batch"] == 3
    ref_one = runtime.run("digit", torch.from_numpy(x))
    ref_two = runtime.run("digit+parity", torch.from_numpy(x))
    np.testing.assert_allclose(scores(one, "digit"), softmax(ref_one[0].numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores(two, "digit"), softmax(ref_two[0].numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores(two, "parity"), softmax(ref_two[1].numpy()), rtol=1e-5, atol=1e-6)
    # the shared task agrees across combinations, and the label is the argmax
    np.testing.assert_allclose(scores(one, "digit"), scores(two, "digit"), atol=1e-6)
    labels = [p["digit"]["label"] for p in one["predictions"]]
    assert labels == [str(i) for i in scores(one, "digit").argmax(1)]
    t = one["timings_ms"]
    assert t["total"] >= t["execute"] > 0 and t["preprocess"] >= 0 and one["model_version"] == "test-1"


def test_omitted_tasks_means_all_tasks(server: Server) -> None:
    r = infer_json(server, None, normalise(digit_images()[:1], server.bundle))
    assert r.status_code == 200 and r.json()["method"] == "digit+loop+parity"


@pytest.mark.parametrize("how", ["multipart", "raw"])
def test_png_upload_is_preprocessed_as_the_manifest_says(server: Server, runtime, how: str) -> None:
    imgs = digit_images()[:1]
    png = png_of(imgs[0])
    if how == "multipart":
        r = httpx.post(server.url + "/infer?tasks=digit", files={"image": ("d.png", png, "image/png")}, timeout=30)
    else:
        r = httpx.post(server.url + "/infer?tasks=digit", content=png, headers={"content-type": "image/png"},
                       timeout=30)
    assert r.status_code == 200, r.text
    # expected: the same 8-bit pixels normalised independently, run on the runtime directly
    x = normalise(np.round(imgs * 255) / 255, server.bundle)
    expected = softmax(runtime.run("digit", torch.from_numpy(x))[0].numpy())
    np.testing.assert_allclose(scores(r.json(), "digit"), expected, rtol=1e-4, atol=1e-5)


def _truncated_png() -> bytes:
    png = png_of(np.random.default_rng(0).random((1, 64, 64)).astype(np.float32))
    return png[: len(png) // 2]


def _bad_requests(server: Server) -> list[tuple[str, int, str, dict]]:
    x = normalise(digit_images()[:1], server.bundle)
    good = {"inputs": x.tolist()}
    return [
        ("unknown task", 400, "unknown_task", dict(params={"tasks": "digit,age"}, json=good)),
        ("empty tasks", 400, "empty_combination", dict(params={"tasks": ""}, json=good)),
        ("only commas", 400, "empty_combination", dict(params={"tasks": " , "}, json=good)),
        ("not exported, strict", 404, "combination_not_exported",
         dict(params={"tasks": "loop", "strict": "true"}, json=good)),
        ("text as png", 415, "unsupported_image", dict(content=b"hello, not an image",
                                                       headers={"content-type": "image/png"})),
        ("truncated png", 400, "bad_image", dict(content=_truncated_png(), headers={"content-type": "image/png"})),
        ("gif in multipart", 415, "unsupported_media_type",
         dict(files={"image": ("a.gif", b"GIF89a....", "image/gif")})),
        ("no file part", 400, "missing_image", dict(data={"x": "1"}, files={"other": ("", b"", "")})),
        ("text/plain", 415, "unsupported_media_type", dict(content=b"1,2,3", headers={"content-type": "text/plain"})),
        ("wrong shape", 422, "bad_shape", dict(json={"inputs": np.zeros((1, 1, 7, 8)).tolist()})),
        ("wrong dtype strings", 422, "bad_dtype", dict(json={"inputs": [[["a"] * 8] * 8]})),
        ("wrong dtype declared", 422, "invalid_tensor_request",
         dict(json={"inputs": good["inputs"], "dtype": "int64"})),
        ("ragged", 422, "bad_tensor", dict(json={"inputs": [[[0.0] * 8] * 7 + [[0.0] * 3]]})),
        ("non-finite", 422, "bad_tensor", dict(content=b'{"inputs": ' + json.dumps(
            np.full((1, 8, 8), 0.0).tolist()).replace("0.0", "NaN", 1).encode() + b"}",
            headers={"content-type": "application/json"})),
        ("batch above max", 422, "bad_batch", dict(json={"inputs": np.zeros((MAX_BATCH + 1, 1, 8, 8)).tolist()})),
        ("malformed json", 422, "malformed_json",
         dict(content=b'{"inputs": [1, 2', headers={"content-type": "application/json"})),
        ("deep json", 422, "malformed_json", dict(content=b"[" * 60000, headers={"content-type": "application/json"})),
        ("json not an object", 422, "invalid_tensor_request", dict(json=[1, 2, 3])),
        ("oversized", 413, "body_too_large", dict(content=b"0" * 70000, headers={"content-type": "application/json"})),
    ]


def test_every_bad_input_gets_its_4xx_with_a_json_reason_and_the_server_keeps_answering(server: Server) -> None:
    good = {"inputs": normalise(digit_images()[:1], server.bundle).tolist()}
    for name, status, code, kw in _bad_requests(server):
        r = httpx.post(server.url + "/infer", timeout=30, **kw)
        assert r.status_code == status, (name, r.status_code, r.text)
        body = r.json()
        assert body["error"] == code and body["detail"], (name, body)
        if code == "unknown_task":
            assert body["valid_tasks"] == ["digit", "parity", "loop"] and "digit, parity, loop" in body["detail"]
        ok = httpx.post(server.url + "/infer?tasks=digit", json=good, timeout=30)
        assert ok.status_code == 200, (name, ok.text)
    assert server.proc.poll() is None


def test_oversized_body_without_content_length_is_cut_at_the_limit(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b"0" * 8192

    r = httpx.post(server.url + "/infer", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_kserve_v2(server: Server, runtime) -> None:
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(server.url + "/v2/models/digits").json()
    assert [o["name"] for o in meta["outputs"]] == ["digit", "parity", "loop"]
    assert meta["outputs"][0]["shape"] == [-1, 10] and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert httpx.get(server.url + "/v2/models/digits/ready").json() == {"ready": True}
    x = normalise(digit_images()[:2], server.bundle)
    req = {"id": "r1", "inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}], "outputs": [{"name": "parity"}, {"name": "digit"}]}
    r = httpx.post(server.url + "/v2/models/digits/infer", json=req, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "r1" and body["parameters"]["method"] == "digit+parity"
    assert [o["name"] for o in body["outputs"]] == ["parity", "digit"]
    ref = runtime.run("digit+parity", torch.from_numpy(x))
    got = np.array(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"])
    np.testing.assert_allclose(got, softmax(ref[1].numpy()), rtol=1e-5, atol=1e-6)
    # errors
    assert httpx.get(server.url + "/v2/models/faces").status_code == 404
    r = httpx.post(server.url + "/v2/models/faces/infer", json=req)
    assert r.status_code == 404 and r.json()["error"] == "unknown_model"
    bad = {**req, "outputs": [{"name": "age"}]}
    r = httpx.post(server.url + "/v2/models/digits/infer", json=bad)
    assert r.status_code == 400 and "digit" in r.json()["detail"]
    bad = {**req, "inputs": [{**req["inputs"][0], "datatype": "INT64"}]}
    assert httpx.post(server.url + "/v2/models/digits/infer", json=bad).json()["error"] == "bad_dtype"
    bad = {**req, "inputs": [{**req["inputs"][0], "shape": [3, 1, 8, 8]}]}
    assert httpx.post(server.url + "/v2/models/digits/infer", json=bad).status_code == 422


def test_tasks_lists_tasks_combinations_and_macs(server: Server) -> None:
    body = httpx.get(server.url + "/tasks").json()
    assert [t["name"] for t in body["tasks"]] == ["digit", "parity", "loop"]
    macs = {c["combination"]: c["macs"] for c in body["combinations"]}
    assert set(macs) == {"digit", "digit+parity", "digit+loop+parity"}
    assert macs["digit"] < macs["digit+parity"] < macs["digit+loop+parity"]
    assert body["max_batch"] == MAX_BATCH


def _counter(text: str, combination: str, status: str) -> float:
    m = re.search(rf'^pam_requests_total{{combination="{re.escape(combination)}",status="{status}"}} (\S+)$',
                  text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_count_a_request_under_its_combination(server: Server) -> None:
    before = httpx.get(server.url + "/metrics").text
    x = normalise(digit_images()[:1], server.bundle)
    assert infer_json(server, "parity,digit", x).status_code == 200
    assert infer_json(server, "digit,nope", x).status_code == 400
    after = httpx.get(server.url + "/metrics").text
    assert _counter(after, "digit+parity", "200") == _counter(before, "digit+parity", "200") + 1
    assert _counter(after, "none", "400") == _counter(before, "none", "400") + 1
    assert re.search(r'pam_execute_duration_seconds_count{combination="digit\+parity",status="200"} [1-9]', after)
    assert re.search(r'pam_request_duration_seconds_bucket{combination="digit\+parity",le="\+Inf",status="200"}', after)
    assert "pam_requests_in_flight" in after and 'pam_method_macs{combination="digit"}' in after


def wait_for_lines(server: Server, needle: str, timeout_s: float = 3.0) -> list[dict]:
    import time

    deadline = time.time() + timeout_s
    while True:
        lines = [json.loads(line) for line in server.log_lines() if needle in line]
        if lines or time.time() > deadline:
            time.sleep(0.1)  # and any duplicate would have arrived too
            return [json.loads(line) for line in server.log_lines() if needle in line]
        time.sleep(0.02)


def test_one_json_log_line_per_request_with_its_fields(server: Server) -> None:
    x = normalise(digit_images()[:2], server.bundle)
    r = infer_json(server, "digit,parity", x, headers={"x-request-id": "log-test-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "log-test-42"
    lines = wait_for_lines(server, '"log-test-42"')  # written by the log thread, off the request path
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == "log-test-42" and line["status"] == 200 and line["path"] == "/infer"
    assert line["combination"] == "digit+parity" and line["method"] == "digit+parity" and line["batch"] == 2
    assert {"preprocess", "queue", "execute", "total", "server_total"} <= set(line["timings_ms"])
    assert line["timings_ms"]["execute"] == r.json()["timings_ms"]["execute"]


def test_property_based_run_against_the_openapi_schema_finds_no_5xx(server: Server) -> None:
    _run_schemathesis(server, max_examples=40)


@pytest.mark.slow
def test_property_based_run_thorough(server: Server) -> None:
    _run_schemathesis(server, max_examples=300)


def _run_schemathesis(server: Server, max_examples: int) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(httpx.get(server.url + "/openapi.json").json())
    seen: list[int] = []

    @given(case=schema.as_strategy())
    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call(base_url=server.url, timeout=30)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

    check()
    assert server.proc.poll() is None
    assert any(s >= 400 for s in seen) and any(s == 200 for s in seen)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason="Debian's chromium and chromedriver are not installed (./setup.sh installs them as root)")
def test_dashboard_charts_every_called_combination_in_headless_chromium(server: Server, tmp_path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    x = normalise(digit_images()[:1], server.bundle)
    called = ["digit", "digit+parity"]
    for combo in called:
        for _ in range(5):
            assert infer_json(server, combo.replace("+", ","), x).status_code == 200
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/dashboard")
        WebDriverWait(driver, 20).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".chart")) >= len(called))
        charts = {el.get_attribute("data-combination"): el for el in driver.find_elements(By.CSS_SELECTOR, ".chart")}
        assert set(called) <= set(charts)
        for combo in called:
            panel = charts[combo]
            assert panel.find_elements(By.CSS_SELECTOR, "svg polyline.p50")
            assert panel.find_elements(By.CSS_SELECTOR, "svg polyline.p95")
            assert "MACs" in panel.find_element(By.CSS_SELECTOR, ".facts").text
        # the overview has p50, p95 and MACs bars for every exported combination
        bars = driver.find_elements(By.CSS_SELECTOR, "#overview-chart rect")
        assert len(bars) == 3 * 3
        # exactly the combinations the server counted as answered (from /metrics) have a live chart
        metrics = httpx.get(server.url + "/metrics").text
        # (any combination: the schemathesis run above also asks for ones answered by a superset method)
        answered = {c for c in re.findall(r'^pam_requests_total{combination="([^"]+)",status="200"}', metrics, re.M)
                    if _counter(metrics, c, "200") > 0}
        assert set(charts) == answered
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
    finally:
        driver.quit()


def test_grafana_dashboard_queries_only_metrics_the_server_exports(server: Server) -> None:
    from tests.service_support import ROOT

    dash = json.loads((ROOT / "service" / "grafana" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bpam_[a-z_]+", e)}
    exported = httpx.get(server.url + "/metrics").text
    names = set(re.findall(r"^# TYPE (pam_[a-z_]+) (\w+)", exported, re.M))
    available = {n for n, _ in names} | {n + s for n, kind in names if kind == "histogram"
                                         for s in ("_bucket", "_sum", "_count")}
    available |= {n + "_total" for n, kind in names if kind == "counter"}
    assert used and used <= available, used - available
    assert any("histogram_quantile(0.95" in e and "pam_request_duration_seconds_bucket" in e for e in exprs)
