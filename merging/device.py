"""Where training runs: ``auto | cpu | cuda[:N] | mps``, and optional mixed precision.

Only the training loops (``merging.train.fit``, the pruner's fine-tunes through it, MTZ's
retraining) move a network to the device; they move it back to where it was (the CPU) when they
are done, so checkpoints, exported programs and the service only ever see CPU tensors.

The device of a run is chosen once (``pam ... --device``, or :func:`use_device` in the Python
API) and read by every loop that is not given one explicitly; that way the benchmark's yardsticks
and the merge-then-prune pipeline follow it without every config carrying it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from merging.errors import MergingError

Amp = Literal["off", "bf16", "fp16"]
AMP_CHOICES: tuple[str, ...] = ("off", "bf16", "fp16")
DEVICE_HELP = "auto | cpu | cuda | cuda:N | mps (auto: a GPU when one is present, else the CPU)"

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``spec`` -> a device that exists here, or a coded :class:`MergingError` saying why not."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    m = _DEVICE_RE.match(text)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise MergingError("bad_device", f"unknown device {spec!r}: expected {DEVICE_HELP}")
    kind, index = m.group(1), m.group(2)
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise MergingError("device_unavailable", "--device mps: this machine has no usable MPS (Apple GPU) backend")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise MergingError(
            "device_unavailable",
            f"--device {text}: CUDA is not available here (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto",
        )
    count = torch.cuda.device_count()
    i = int(index) if index is not None else torch.cuda.current_device()
    if i >= count:
        raise MergingError("device_unavailable", f"--device {text}: only {count} CUDA device(s) here")
    return torch.device("cuda", i)


@dataclass(frozen=True)
class Precision:
    """Autocast settings of a training loop on one device."""

    amp: Amp = "off"  # off: float32 throughout; bf16 / fp16: autocast the forward pass

    def check(self, device: torch.device) -> None:
        if self.amp not in AMP_CHOICES:
            raise MergingError("bad_argument", f"--amp is one of {AMP_CHOICES}, not {self.amp!r}")
        if self.amp == "fp16" and device.type != "cuda":
            # fp16 autocast needs a loss scaler and GPU kernels; on the CPU it is slow and unstable.
            raise MergingError("bad_argument", f"--amp fp16 needs a CUDA device (got {device}); use bf16 or off")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(device.type) if self.amp == "fp16" else None


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """One backward pass and optimizer step, through the fp16 loss scaler when there is one."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


_current: torch.device | None = None  # None: the CPU (today's behaviour), set by use_device/set_device
_precision = Precision()


def set_device(spec: str | torch.device | None, amp: Amp = "off") -> torch.device:
    """Make ``spec`` (resolved) the device of every training loop not given one; returns it."""
    global _current, _precision
    device = resolve_device(spec)
    precision = Precision(amp)
    precision.check(device)
    _current, _precision = device, precision
    return device


def current_device() -> torch.device:
    return _current or torch.device("cpu")


def current_precision() -> Precision:
    return _precision


@contextlib.contextmanager
def use_device(spec: str | torch.device | None, amp: Amp = "off") -> Iterator[torch.device]:
    """``with use_device("cuda"): prune(...)``: the device (and autocast) of the loops run inside."""
    global _current, _precision
    saved = (_current, _precision)
    try:
        yield set_device(spec, amp)
    finally:
        _current, _precision = saved


