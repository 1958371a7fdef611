# syntax=docker/dockerfile:1
# A CPU image that serves an exported bundle with `pam serve` (ExecuTorch runtime + FastAPI).
#   docker build -t pam-mobile .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/demo/bundle:/bundle:ro" pam-mobile
ARG PYTHON_IMAGE=python:3.11-slim
# torch==2.13.0 from the default index is the large CUDA build; point this at a CPU wheel index
# (or a local wheel directory via PIP_FIND_LINKS) to keep the image CPU-only and small.
ARG PIP_EXTRA_INDEX_URL=

# ---------------------------------------------------------------- build: a virtualenv with everything
FROM ${PYTHON_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone: editing the code does not re-download torch.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
# Then the code (no dependency resolution any more).
COPY README.md ./
COPY pam_common ./pam_common
COPY merging ./merging
COPY mobile_export ./mobile_export
COPY service ./service
COPY pam_app ./pam_app
RUN pip install --no-deps . && pam --help >/dev/null

# ---------------------------------------------------------------- runtime: the venv, a non-root user
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 pam
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PAM_HOST=0.0.0.0 \
    PAM_PORT=8000 \
    PAM_BUNDLE_DIR=/bundle
USER pam
WORKDIR /home/pam
EXPOSE 8000
# Request heads, slow clients and connections are bounded by `pam serve` itself (PAM_MAX_HEADER_BYTES,
# PAM_HEADER_TIMEOUT_S, PAM_BODY_TIMEOUT_S, PAM_MAX_CONNECTIONS, PAM_KEEP_ALIVE_S; docs/service.md), so no
# front proxy is required; override them with -e like any other setting.
# Ready only once the bundle is probed and loaded (start-up includes a child-process probe).
HEALTHCHECK --interval=15s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('PAM_PORT', '8000'), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["pam", "serve"]
CMD ["/bundle"]
