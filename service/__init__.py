"""The device-runtime service: a bundle served over HTTP with the ExecuTorch runtime.

Layout: ``core/config.py`` (the one Settings class), ``api/routes/`` (thin routes), ``schemas.py``
(request/response models), ``inference.py`` (one request, end to end), ``preprocess.py`` (bodies
to tensors), ``runtime_pool.py`` (the concurrency design and hot reload), ``middleware.py``
(request id, body limit, log line, metrics), ``metrics.py``, ``logging.py``, ``dashboard/``,
``grafana/``, ``commands.py`` (``pam serve``, ``pam bench-serve``), ``bench.py``.
Imports nothing from ``merging``: like a phone, it has the runtime and the manifest only.
"""
