"""``pam serve`` and ``pam bench-serve`` (parser side light: heavy imports happen in the handlers)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from mobile_export.errors import ExportError
from service.errors import ServiceError

USER_ERRORS: tuple[type[BaseException], ...] = (ExportError, ServiceError)

# CLI flag -> Settings field (flags left unset keep the PAM_* environment value or the default)
_FLAGS = {"host": "host", "port": "port", "threads": "threads", "workers": "workers", "executor": "executor",
          "queue_bound": "queue_bound", "max_body_bytes": "max_body_bytes", "timeout": "request_timeout_s",
          "log_format": "log_format", "http": "http", "loop": "loop", "admin_token": "admin_token",
          "max_loaded": "max_loaded", "max_image_pixels": "max_image_pixels", "max_header_bytes": "max_header_bytes",
          "header_timeout": "header_timeout_s", "body_timeout": "body_timeout_s", "max_connections": "max_connections",
          "keep_alive": "keep_alive_s", "batch_window_us": "batch_window_us", "batch_max": "batch_max",
          "inline_max_ms": "inline_max_ms", "bundle_root": "bundle_root",
          "manifest_public_key": "manifest_public_key"}


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("settings (each also PAM_<FIELD> in the environment)")
    g.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=None, help="port (default 8000; 0: any free port)")
    g.add_argument("--threads", type=int, default=None, help="XNNPACK threads per inference (device cores)")
    g.add_argument("--workers", type=int, default=None, help="worker processes, one runtime each")
    g.add_argument("--executor", choices=["auto", "thread", "inline"], default=None,
                   help="auto (default): methods measured under --inline-max-ms on the event loop, the rest on one "
                        "runtime thread; thread; inline")
    g.add_argument("--inline-max-ms", type=float, default=None, help="auto executor: inline below this execute time")
    g.add_argument("--queue-bound", type=int, default=None, help="requests allowed to wait; beyond: 503")
    g.add_argument("--max-body-bytes", type=int, default=None, help="larger bodies get 413")
    g.add_argument("--timeout", type=float, default=None, help="per-request timeout in seconds (504)")
    g.add_argument("--http", choices=["auto", "h11", "httptools"], default=None, help="HTTP parser")
    g.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default=None, help="event loop")
    g.add_argument("--log-format", choices=["json", "text"], default=None)
    g.add_argument("--admin-token", default=None, help="token for POST /admin/reload (X-Admin-Token)")
    g.add_argument("--lazy", action="store_true", default=None, help="load each method on first use")
    g.add_argument("--max-loaded", type=int, default=None, help="with --lazy: methods kept loaded (LRU)")
    g.add_argument("--no-probe", dest="probe", action="store_false", default=None,
                   help="skip the child-process probe of the bundle")
    g.add_argument("--strict-combinations", dest="strict_combinations", action="store_true", default=None,
                   help="404 for a combination without its own method (default: its cheapest superset answers)")
    g.add_argument("--max-image-pixels", type=int, default=None,
                   help="largest declared image (w*h) decoded (default: from the model's input size)")
    g.add_argument("--max-header-bytes", type=int, default=None, help="request line + headers; beyond: 431")
    g.add_argument("--header-timeout", type=float, default=None, help="seconds for a request head to arrive")
    g.add_argument("--body-timeout", type=float, default=None, help="seconds allowed between body chunks (408)")
    g.add_argument("--max-connections", type=int, default=None, help="open connections + tasks; beyond: 503")
    g.add_argument("--keep-alive", type=float, default=None, help="idle keep-alive seconds")
    g.add_argument("--no-batching", dest="batching", action="store_false", default=None,
                   help="one execute per request (default: dynamic batching per method)")
    g.add_argument("--batch-window-us", type=int, default=None,
                   help="wait up to this long for more requests to join a batch (default 0: no wait)")
    g.add_argument("--batch-max", type=int, default=None, help="rows per batched execute (default: max_batch)")
    g.add_argument("--batch-union", dest="batch_union", action="store_true", default=None,
                   help="let requests for different combinations share one execute of a method covering them all "
                        "when the costs measured at load say it is cheaper")
    g.add_argument("--bundle-root", default=None,
                   help="reloads only of directories under it (default: the served bundle's parent)")
    g.add_argument("--manifest-public-key", default=None,
                   help="Ed25519 public key (PEM, or base64/hex of 32 bytes): bundles need a valid manifest.sig")


def settings_from_args(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from service.core.config import Settings

    overrides = {field: getattr(args, flag) for flag, field in _FLAGS.items() if getattr(args, flag, None) is not None}
    for flag in ("lazy", "probe", "strict_combinations", "batching", "batch_union"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    try:
        return Settings(bundle_dir=Path(args.bundle_dir), **overrides)
    except ValidationError as e:
        raise ServiceError(2, "bad_settings", str(e)) from e


def settings_env(settings: Any) -> dict[str, str]:
    """The settings as PAM_* variables, so uvicorn's worker processes rebuild the same Settings."""
    from service.core.config import ENV_PREFIX

    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def run_serve(args: argparse.Namespace) -> int:
    import tempfile

    import uvicorn

    from service.logging import configure
    from service.model_loading import check_bundle

    settings = settings_from_args(args)
    configure(settings.log_format, settings.log_level)
    bundle = settings.bundle_dir
    print(f"pam serve: checking {bundle} (manifest, sha256{', child-process probe' if settings.probe else ''})",
          file=sys.stderr, flush=True)
    manifest = check_bundle(bundle, settings)  # a bad bundle stops here with a clean message
    # The probe is done: a single worker loads straight away. Several workers keep probing, because
    # uvicorn restarts them (SIGHUP to the master, or a crash) and the bundle may have changed since.
    probe_again = settings.probe and settings.workers > 1
    os.environ.update(settings_env(settings.model_copy(update={"probe": probe_again})))
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pam-prom-")
    example = manifest.methods[0].tasks
    print(f"pam serve: {manifest.model_name} {manifest.model_version}, {len(manifest.methods)} methods, on "
          f"http://{settings.host}:{settings.port}  (try: curl -s -X POST "
          f"'http://{settings.host}:{settings.port}/infer?tasks={','.join(example)}' -F image=@digit.png)",
          file=sys.stderr, flush=True)
    from service.http_protocol import protocol_for

    bounds = dict(http=protocol_for(settings.http), limit_concurrency=settings.max_connections,
                  timeout_keep_alive=settings.keep_alive_s, h11_max_incomplete_event_size=settings.max_header_bytes)
    if settings.workers == 1:
        uvicorn.run("service.main:app_from_env", factory=True, host=settings.host, port=settings.port,
                    log_config=None, access_log=False, log_level=settings.log_level, loop=settings.loop, **bounds)
        return 0
    import socket

    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config("service.main:app_from_env", factory=True, host=settings.host, port=settings.port,
                            workers=settings.workers, log_config=None, access_log=False,
                            log_level=settings.log_level, loop=settings.loop, **bounds)
    sock = config.bind_socket()
    # uvicorn's shared listening socket is created with proto 0, so asyncio never sets TCP_NODELAY on the
    # connections workers accept; measured: every keep-alive request then waited ~44 ms (Nagle + delayed
    # ACK). Linux copies TCP_NODELAY from the listener to accepted sockets.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Multiprocess(config, sockets=[sock]).run()
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from pam_app.bench.serve import BenchConfig, run_benchmark

    cfg = BenchConfig(
        bundle_dir=Path(args.bundle_dir), clients=tuple(int(c) for c in args.clients.split(",")),
        requests=args.requests, combinations=tuple(args.combinations.split(";")) if args.combinations else None,
        payload=args.payload, threads=args.threads, workers=args.workers, executor=args.executor,
        direct_runs=args.direct_runs, out=Path(args.out), lazy=args.lazy, max_loaded=args.max_loaded,
        server_args=tuple(args.server_args.split()) if args.server_args else (),
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        batch_window_us=args.batch_window_us, attacks=not args.no_attacks,
        mix=tuple(args.mix.split(";")) if args.mix else None,
    )
    run_benchmark(cfg)
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from service.bundle_guard import generate_keypair, sign_bundle

    if args.new_key:
        private, public = generate_keypair()
        key_path = Path(args.new_key)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private)
        print(f"pam sign-bundle: new Ed25519 key in {key_path}; serve with PAM_MANIFEST_PUBLIC_KEY={public}",
              file=sys.stderr)
    elif args.key:
        private = Path(args.key).read_text()
    else:
        raise ServiceError(2, "no_key", "give --key PRIVATE_KEY.pem (or --new-key PATH to create one)")
    try:
        out = sign_bundle(args.bundle_dir, private)
    except (ValueError, OSError) as e:
        raise ServiceError(2, "sign_failed", str(e)) from e
    print(f"pam sign-bundle: wrote {out}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP (/infer, KServe V2, /metrics, /dashboard)",
                       description="Serve an exported bundle with the ExecuTorch runtime.")
    p.add_argument("bundle_dir", metavar="BUNDLE_DIR", help="directory with manifest.json and model.pte")
    _add_settings_flags(p)
    p.set_defaults(func=run_serve)

    g = sub.add_parser("sign-bundle", help="sign a bundle's manifest (Ed25519) for PAM_MANIFEST_PUBLIC_KEY",
                       description="Write BUNDLE_DIR/manifest.sig, the Ed25519 signature of its manifest.json.")
    g.add_argument("bundle_dir", metavar="BUNDLE_DIR")
    g.add_argument("--key", default=None, help="PEM private key (PKCS8, unencrypted)")
    g.add_argument("--new-key", default=None, metavar="PATH", help="create a new key at PATH (mode 600) and use it")
    g.set_defaults(func=run_sign)

    b = sub.add_parser("bench-serve", help="benchmark the HTTP service against the runtime called directly",
                       description="Start `pam serve` on loopback and measure RPS and latency per combination.")
    b.add_argument("bundle_dir", metavar="BUNDLE_DIR")
    b.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    b.add_argument("--requests", type=int, default=400, help="requests per (combination, clients) cell")
    b.add_argument("--combinations", default=None,
                   help="';'-separated combinations, e.g. 'digit;digit,parity' (default: the cheapest and all tasks)")
    b.add_argument("--payload", choices=["png", "multipart", "json"], default="png",
                   help="body: raw PNG, multipart PNG, or JSON tensor")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--executor", choices=["auto", "thread", "inline"], default="auto")
    b.add_argument("--server-args", default=None, help="extra `pam serve` flags, e.g. '--http h11 --loop asyncio'")
    b.add_argument("--lazy", action="store_true", help="serve with lazy method loading")
    b.add_argument("--max-loaded", type=int, default=None, help="with --lazy: methods kept loaded")
    b.add_argument("--direct-runs", type=int, default=2000, help="runtime calls per combination, direct baseline")
    b.add_argument("--variants", default="bare,service,service+batching",
                   help="servers to measure side by side: bare (a bare ASGI app), service (no batching), "
                        "service+batching, service+union (batching across combinations)")
    b.add_argument("--batch-window-us", type=int, default=0, help="batching window of the service+batching variant")
    b.add_argument("--mix", default=None,
                   help="';'-separated combinations asked concurrently (client i: the i-th mod k), e.g. "
                        "'digit;parity;loop': MACs per request against req/s on the service variants")
    b.add_argument("--no-attacks", action="store_true", help="skip the large requests and the RSS check after them")
    b.add_argument("--out", default="results/serve-bench", help="output stem: writes STEM.json and STEM.md")
    b.set_defaults(func=run_bench)
