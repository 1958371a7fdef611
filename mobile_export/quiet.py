"""Keep library noise off the user's terminal during an export, and in a log file instead.

torch.export, ExecuTorch and torchao print on every export: torchao's failed loads of CUDA
kernels (``Failed to load .../_C_cutlass_90a.abi3.so``), cpuinfo's probes, deprecation and
pytree warnings, some from C++ straight to file descriptor 2. :func:`quiet_stderr` points fd 2
(and so Python's ``sys.stderr``, ``warnings`` and ``logging``) at a log file for the duration, and
hands back a stream to the real terminal for progress bars and messages meant for the user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def quiet_stderr(log_path: Path) -> Iterator[IO[str]]:
    """Redirect fd 2 to ``log_path`` (appended); yield a text stream to the original stderr."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, errors="replace")
    log = open(log_path, "a", buffering=1, errors="replace")
    os.dup2(log.fileno(), 2)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_show = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: IO[str] | None = None, line: str | None = None) -> None:
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    try:
        yield terminal
    finally:
        warnings.showwarning = old_show
        root.removeHandler(handler)
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        log.close()
        terminal.close()

