"""KServe V2 with the official client (``tritonclient[http]``) against a live `pam serve` on loopback:
server and model metadata, configuration, statistics, inference with binary and JSON tensors."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from tests.service_support import Server, digit_images, digits_bundle, digits_runtime, normalise, serve, softmax

tritonclient_http = pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-v2") / "server.log"
    with serve(digits_bundle(), log, "--no-probe") as s:
        yield s


@pytest.fixture(scope="module")
def runtime():  # type: ignore[no-untyped-def]
    return digits_runtime()



def client(server: Server):
    return tritonclient_http.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=30)


def test_server_and_model_metadata_config_with_the_official_client(server: Server) -> None:
    c = client(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits")
    meta = c.get_server_metadata()
    assert meta["name"] == "pam-mobile" and {"binary_tensor_data", "statistics", "model_configuration"} <= set(
        meta["extensions"])
    mm = c.get_model_metadata("digits")
    assert mm["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [(o["name"], o["shape"]) for o in mm["outputs"]] == [("digit", [-1, 10]), ("parity", [-1, 2]),
                                                                ("loop", [-1, 2])]
    assert c.get_model_metadata("digits", model_version="test-1")["versions"] == ["test-1"]
    cfg = c.get_model_config("digits")
    assert cfg["max_batch_size"] == 4 and cfg["input"][0]["dims"] == [1, 8, 8]
    assert {m["name"] for m in cfg["methods"]} == {"digit", "digit+parity", "digit+loop+parity"}
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException):
        c.get_model_metadata("faces")
    with pytest.raises(InferenceServerException):
        c.get_model_metadata("digits", model_version="nope")


@pytest.mark.parametrize("mode", ["binary", "json", "binary-in-json-out", "json-in-mixed-out"])
def test_infer_binary_and_json_tensors_equal_the_runtime(server: Server, runtime, mode: str) -> None:
    c = client(server)
    x = normalise(digit_images()[:3], server.bundle)
    inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=mode.startswith("binary"))
    out_bin = {"binary": (True, True), "json": (False, False), "binary-in-json-out": (False, False),
               "json-in-mixed-out": (True, False)}[mode]
    outs = [tritonclient_http.InferRequestedOutput("parity", binary_data=out_bin[0]),
            tritonclient_http.InferRequestedOutput("digit", binary_data=out_bin[1])]
    r = c.infer("digits", [inp], outputs=outs, request_id="q1")
    resp = r.get_response()
    assert resp["id"] == "q1" and resp["parameters"]["method"] == "digit+parity"
    assert [o["name"] for o in resp["outputs"]] == ["parity", "digit"]
    assert [("data" in o) for o in resp["outputs"]] == [not out_bin[0], not out_bin[1]]
    ref = runtime.run("digit+parity", torch.from_numpy(x))
    np.testing.assert_allclose(r.as_numpy("digit"), softmax(ref[0].numpy()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.as_numpy("parity"), softmax(ref[1].numpy()), rtol=1e-5, atol=1e-6)
    assert r.as_numpy("digit").dtype == np.float32 and r.as_numpy("digit").shape == (3, 10)


def test_no_outputs_means_all_tasks_in_binary(server: Server, runtime) -> None:
    x = normalise(digit_images()[:1], server.bundle)
    inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = client(server).infer("digits", [inp])
    assert r.get_response()["parameters"]["method"] == "digit+loop+parity"
    ref = runtime.run("digit+loop+parity", torch.from_numpy(x))
    for i, task in enumerate(["digit", "loop", "parity"]):
        np.testing.assert_allclose(r.as_numpy(task), softmax(ref[i].numpy()), rtol=1e-5, atol=1e-6)


def test_statistics_count_requests_and_executes_per_method(server: Server) -> None:
    c = client(server)
    before = c.get_inference_statistics("digits")["model_stats"][0]
    x = normalise(digit_images()[:2], server.bundle)
    for _ in range(3):
        inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        c.infer("digits", [inp], outputs=[tritonclient_http.InferRequestedOutput("digit")])
    after = c.get_inference_statistics("digits")["model_stats"][0]
    assert after["name"] == "digits" and after["version"] == "test-1"
    assert after["inference_count"] - before["inference_count"] == 6  # images
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 3
    assert after["inference_stats"]["success"]["ns"] > before["inference_stats"]["success"]["ns"]
    per = {m["name"]: m for m in after["methods"]}
    per_before = {m["name"]: m for m in before["methods"]}
    assert per["digit"]["execution_count"] - per_before["digit"]["execution_count"] == 3  # sequential: no batching
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in per["digit"]["batch_stats"]}
    assert sizes.get(2, 0) >= 3
    # a refused request counts as a failure of its method
    bad = {"inputs": [{"name": "input", "shape": [1, 1, 8, 7], "datatype": "FP32", "data": [0.0] * 56}],
           "outputs": [{"name": "digit"}]}
    assert httpx.post(server.url + "/v2/models/digits/infer", json=bad).status_code == 422
    again = httpx.get(server.url + "/v2/models/digits/stats").json()["model_stats"][0]
    assert again["inference_stats"]["fail"]["count"] == after["inference_stats"]["fail"]["count"] + 1


def test_malformed_binary_requests_get_4xx(server: Server) -> None:
    url = server.url + "/v2/models/digits/infer"
    head = b'{"inputs":[{"name":"input","shape":[1,1,8,8],"datatype":"FP32","parameters":{"binary_data_size":256}}]}'
    good = head + np.zeros(64, "<f4").tobytes()
    assert httpx.post(url, content=good, headers={"inference-header-content-length": str(len(head))}).status_code == 200
    short, text = head.replace(b"256", b"255"), head.replace(b"256", b'"a"')
    cases = [
        (good, "x", 400), (good, str(len(good) + 1), 400),  # header length not a number / past the body
        (head + b"\0" * 255, str(len(head)), 422),  # binary part too short
        (head + b"\0" * 260, str(len(head)), 422),  # bytes that belong to no input
        (short + b"\0" * 255, str(len(short)), 422),  # size does not match the shape
        (text + b"\0" * 256, str(len(text)), 422),  # size not an integer
    ]
    for body, hl, status in cases:
        r = httpx.post(url, content=body, headers={"inference-header-content-length": hl})
        assert r.status_code == status, (hl, r.text)
        assert r.json()["error"]
