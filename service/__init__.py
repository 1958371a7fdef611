"""The device-runtime service: a bundle served over HTTP with the ExecuTorch runtime.

Layout: ``core/config.py`` (the one Settings class), ``api/routes/`` (thin routes), ``schemas.py``
(response models), ``hotpath.py`` (the two inference routes as plain ASGI, end to end, and the native
``/infer`` answer), ``v2_protocol.py`` (the KServe V2 protocol's logic), ``openapi_doc.py`` (their exact
request schemas), ``preprocess.py`` (bodies to tensors, outputs to probabilities), ``model_loading.py``
(a bundle checked, probed, loaded and timed), ``runtime_pool.py`` (the concurrency design and hot
reload), ``batching.py`` (what the dynamic batcher runs next), ``bundle_guard.py`` (what a reload may
read; manifest signatures), ``middleware.py`` (the other routes: request id, body
limit, log line, metrics), ``metrics.py``, ``logging.py``, ``dashboard/``,
``grafana/``, ``commands.py`` (``pam serve``, ``pam bench-serve``), ``bench.py``.
Imports nothing from ``merging``: like a phone, it has the runtime and the manifest only.
"""
