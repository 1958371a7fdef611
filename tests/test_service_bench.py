"""`pam bench-serve` on the test bundle: the three variants side by side, the attacks, the files."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service_support import digits_bundle, free_port


@pytest.mark.slow
def test_bench_serve_measures_bare_service_and_batching_side_by_side(tmp_path: Path) -> None:
    import subprocess
    import sys

    from pam_app.bench.serve import BenchConfig
    from tests.service_support import ROOT

    cfg = BenchConfig(bundle_dir=digits_bundle(), clients=(1, 4), requests=40, direct_runs=50,
                      attack_rounds=3, out=tmp_path / "serve-test")
    # its own process, as `pam bench-serve` runs: the thread count is fixed once a program is loaded,
    # and other tests in this process may already have loaded one with another count
    code = ("from pathlib import Path; from pam_app.bench.serve import BenchConfig, run_benchmark; "
            f"run_benchmark(BenchConfig(bundle_dir=Path({str(cfg.bundle_dir)!r}), clients=(1, 4), requests=40, "
            f"direct_runs=50, attack_rounds=3, out=Path({str(cfg.out)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(cfg.out.with_suffix(".json").read_text())
    assert r["total_errors"] == 0
    assert {c["variant"] for c in r["http"]} == {"bare", "service", "service+batching"}
    assert len(r["http"]) == 3 * 2 * 2 and all(c["rps"] > 0 and c["p50_ms"] > 0 for c in r["http"])
    for s in r["summary"].values():
        assert s["service"]["rps_8_over_bare"] is None  # no 8-client cell in this run
        assert set(s["batching_gain"]) == {"1", "4"}
    servers = {s["variant"]: s for s in r["servers"]}
    assert "attack_statuses" not in servers["bare"]
    for v in ("service", "service+batching"):
        st = servers[v]["attack_statuses"]
        assert st.get("200") == 3 and st.get("415") == 3 and st.get("431") == 5, st
        assert servers[v]["alive_after_attacks"] and servers[v]["rss_after_attacks_mb"] > 0
    assert "service+batching" in cfg.out.with_suffix(".md").read_text()


@pytest.mark.slow  # a benchmark helper (~30 s): the bare ASGI app of pam bench-serve
def test_the_bare_server_answers_like_the_service(tmp_path: Path) -> None:
    """The bare app is a fair anchor only if it does the same work: same decode, same method, same numbers."""
    import subprocess
    import sys
    import time

    from mobile_export.manifest import Manifest
    from pam_app.bench.serve import sample_png
    from tests.service_support import ROOT, serve

    png = sample_png(Manifest.load(digits_bundle()))
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "pam_app.bench.serve_bare", str(digits_bundle()), "--port",
                            str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and bare.poll() is None
            time.sleep(0.2)
        a = httpx.post(f"http://127.0.0.1:{port}/infer?tasks=digit,parity", content=png,
                       headers={"content-type": "image/png"}).json()
    finally:
        bare.terminate()
        bare.wait(timeout=20)
    with serve(digits_bundle(), tmp_path / "s.log", "--no-probe") as s:
        b = httpx.post(s.url + "/infer?tasks=digit,parity", content=png, headers={"content-type": "image/png"}).json()
    assert a["method"] == b["method"] == "digit+parity"
    for task in ("digit", "parity"):
        np.testing.assert_allclose(a["predictions"][0][task], list(b["predictions"][0][task]["scores"].values()),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stem", ["serve-digits", "serve-vgg128"])
def test_results_written_with_the_old_variant_name_render_as_bare(stem: str) -> None:
    """Results from before issue 21 call the bare variant "reference" (and its ratio key
    ``rps_8_over_reference``): read as ``bare``, they give the same tables their own code wrote."""
    from pam_app.bench.serve_report import markdown
    from tests.service_support import ROOT

    r = json.loads((ROOT / "results" / f"{stem}.json").read_text())
    # the premise: this file keeps the old names (if it is re-measured, keep an old one for this test)
    assert "reference" in r["config"]["variants"]
    assert "rps_8_over_reference" in next(iter(r["summary"].values()))["service"]
    written_then = (ROOT / "results" / f"{stem}.md").read_text()
    assert "| reference |" in written_then
    md = markdown(r)
    assert md == written_then.replace("reference", "bare")
    assert "reference" not in md and "| bare |" in md
