#!/usr/bin/env bash
# Sets up a fresh machine: Debian packages the browser tests need, then a virtualenv with the
# project and its pinned dependencies (torch 2.13.0 CPU comes from the wheel on this machine's disk).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium + chromium-driver (headless browser tests)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: chromium/chromedriver missing and not root: the dashboard browser test will be skipped" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
echo "setup: done ($(.venv/bin/python -c 'import torch, executorch; print("torch", torch.__version__)'))"
