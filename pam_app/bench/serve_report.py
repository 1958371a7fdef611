"""The markdown report of ``pam bench-serve`` (the JSON result in tables)."""

from __future__ import annotations

import copy
from typing import Any

# Results written before issue 21 call the bare ASGI app's variant "reference"; read as "bare".
_LEGACY_BARE = "reference"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def with_current_names(r: dict[str, Any]) -> dict[str, Any]:
    """A copy of a result with the legacy variant name and ratio key renamed (the current ones win)."""
    r = copy.deepcopy(r)

    def rename(v: str) -> str:
        return "bare" if v == _LEGACY_BARE else v

    r["config"]["variants"] = [rename(v) for v in r["config"]["variants"]]
    for row in [*r.get("http", []), *r.get("mix", []), *r.get("servers", [])]:
        row["variant"] = rename(row["variant"])
    for s in r.get("summary", {}).values():
        if _LEGACY_BARE in s:
            s.setdefault("bare", s.pop(_LEGACY_BARE))
        for v in s.values():
            if isinstance(v, dict) and "rps_8_over_reference" in v:
                v.setdefault("rps_8_over_bare", v.pop("rps_8_over_reference"))
    return r


def markdown(r: dict[str, Any]) -> str:
    r = with_current_names(r)
    c = r["config"]
    load = r["machine"].get("load_average_1min", {"start": float("nan"), "end": float("nan")})
    lines = [
        f"# pam bench-serve: {r['model']} {r['model_version']}",
        "",
        f"payload `{c['payload']}`, threads {c['threads']}, workers {c['workers']}, executor `{c['executor']}`, "
        f"lazy {c['lazy']} (max loaded {c['max_loaded']}), batching window {c.get('batch_window_us', 0)} us, "
        f"{r['machine']['cpus']} CPUs; loopback, keep-alive clients in one asyncio process. "
        f"Load average (1 min) {load['start']:.1f} at the start, {load['end']:.1f} at the end.",
        "",
        "| variant | combination | MACs | clients | req/s | p50 ms | p95 ms | p99 ms | server execute p50 ms "
        "| errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for cell in r["http"]:
        lines.append(
            f"| {cell['variant']} | {cell['combination']} | {cell['macs']} | {cell['clients']} | "
            f"{cell['rps']:.0f} | {cell['p50_ms']:.3f} | {cell['p95_ms']:.3f} | {cell['p99_ms']:.3f} | "
            f"{cell['server_execute_p50_ms']:.3f} | {cell['errors']} |"
        )
    variants = [v for v in ("bare", "service", "service+batching", "service+union") if v in c["variants"]]
    lines += [
        "",
        "| combination | direct execute p50 ms | direct calls/s | "
        + " | ".join(f"{v}: HTTP overhead p50 ms | {v}: 8 clients ÷ direct" for v in variants)
        + " | service ÷ bare (8 clients) | service+batching ÷ bare (8) | batching gain 1/8/32 |",
        "| --- | ---: | ---: | " + " | ".join("---: | ---:" for _ in variants) + " | ---: | ---: | --- |",
    ]
    for m, s in r["summary"].items():
        gain = s.get("batching_gain") or {}
        lines.append(
            f"| {m} | {s['direct_execute_p50_ms']:.3f} | {s['direct_rps']:.0f} | "
            + " | ".join(f"{_ms(s[v]['http_overhead_p50_ms'])} | {_pct(s[v]['rps_8_over_direct'])}" for v in variants)
            + f" | {_pct(s.get('service', {}).get('rps_8_over_bare'))} | "
            f"{_pct(s.get('service+batching', {}).get('rps_8_over_bare'))} | "
            + " / ".join("n/a" if g is None else f"{g:.2f}x" for g in gain.values())
            + " |"
        )
    if r.get("mix"):
        lines += [
            "",
            "Concurrent requests for different combinations (client i asks combination i mod k): "
            "MACs spent per request (of the method that ran, x rows) against requests per second.",
            "",
            "| variant | combinations | clients | req/s | p50 ms | MACs per request | errors |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for cell in r["mix"]:
            mpr = cell.get("macs_per_request")
            lines.append(
                f"| {cell['variant']} | {cell['combination'][4:]} | {cell['clients']} | {cell['rps']:.0f} | "
                f"{cell['p50_ms']:.3f} | {'n/a' if mpr is None else f'{mpr:,.0f}'} | {cell['errors']} |"
            )
    lines += [
        "",
        "| server | RSS ready MB | after the cells MB | after large requests MB | statuses of the large "
        "requests | alive |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for sv in r.get("servers", []):
        after = sv.get("rss_after_attacks_mb")
        lines.append(
            f"| {sv['variant']} | {sv['rss_ready_mb']:.0f} | {sv['rss_end_mb']:.0f} | "
            f"{'n/a' if after is None else f'{after:.0f}'} | {sv.get('attack_statuses', 'n/a')} | "
            f"{sv.get('alive_after_attacks', 'n/a')} |"
        )
    return "\n".join(lines) + "\n"
