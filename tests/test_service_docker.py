"""No Docker engine runs here: the Dockerfile is read and checked against the code and the docs."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

from tests.service_support import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCS = ROOT / "docs" / "service.md"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_deps_before_code_non_root_with_a_readiness_healthcheck() -> None:
    ins = instructions()
    args = dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    base = args["PYTHON_IMAGE"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert base.startswith("python:3.11") and ">=3.11" in requires
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    # dependencies are installed before any source directory is copied
    order = [(op, rest) for op, rest in ins]
    first_code = min(i for i, (op, rest) in enumerate(order) if op == "COPY" and rest.split()[0] in
                     ("merging", "mobile_export", "service", "."))
    dep_install = min(i for i, (op, rest) in enumerate(order) if op == "RUN" and "requirements.txt" in rest
                      and "pip install" in rest)
    assert dep_install < first_code
    # the final stage runs as a non-root user
    last_from = max(i for i, (op, _) in enumerate(order) if op == "FROM")
    users = [rest for op, rest in order[last_from:] if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    # health check on the readiness endpoint the app really serves
    health = next(rest for op, rest in ins if op == "HEALTHCHECK")
    assert "/v2/health/ready" in health
    from service.main import create_app

    assert "/v2/health/ready" in create_app().openapi()["paths"]


def test_dockerfile_port_and_command_match_the_settings_the_cli_and_the_docs() -> None:
    ins = instructions()
    env = " ".join(rest for op, rest in ins if op == "ENV")
    port = re.search(r"PAM_PORT=(\d+)", env).group(1)  # type: ignore[union-attr]
    assert [rest for op, rest in ins if op == "EXPOSE"] == [port]
    assert "PAM_HOST=0.0.0.0" in env  # reachable from outside the container
    entry = next(rest for op, rest in ins if op == "ENTRYPOINT")
    cmd = next(rest for op, rest in ins if op == "CMD" and "health" not in rest)
    argv = [*json.loads(entry), *json.loads(cmd)]  # exec (JSON array) form, as docker reads it
    assert argv[:2] == ["pam", "serve"]
    from pam_app.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(argv[1:])
    assert args.command == "serve" and args.bundle_dir == re.search(r"PAM_BUNDLE_DIR=(\S+)", env).group(1)  # type: ignore[union-attr]
    # the docs show the same image, port and command
    docs = DOCS.read_text()
    assert args_in_docs(docs, port)
    assert "python:3.11-slim" in docs and "pam serve" in docs and "/v2/health/ready" in docs


def args_in_docs(docs: str, port: str) -> bool:
    """The docs' `docker run` line publishes the image's port and mounts the bundle at its path."""
    for line in docs.splitlines():
        if line.strip().startswith("docker run"):
            words = shlex.split(line.strip())
            if f"{port}:{port}" in words and any(w.endswith(":/bundle:ro") or w.endswith(":/bundle") for w in words):
                return True
    return False


def test_the_service_imports_nothing_from_merging() -> None:
    """Like a phone, the service has the runtime and the manifest only (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; import service.main, pam_app.commands_serve, pam_app.bench.serve, mobile_export.runtime; "
            "print(sorted(m for m in sys.modules if m == 'merging' or m.startswith('merging.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == "[]"
