"""Data parallelism under ``torchrun``: process group, sharding, agreement between ranks, launch.

Launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) or by ``pam ... --nproc N``
(which calls torchrun's own launcher, ``torch.distributed.run``), every rank runs the same
command on the same data. The training loops wrap the network in DistributedDataParallel and
each rank takes its shard of every global batch (see ``MultitaskData.batches``); everything
else (evaluation, importance, budget checks) runs on every rank in lockstep, and whatever
decides a *structure* (which channels go, which tasks freeze) is taken from rank 0 by
:func:`agree_net` / :func:`broadcast_object`, so the ranks can never drift apart. Only rank 0
writes artifacts (:func:`is_main`).

Collectives carry a timeout (``--collective-timeout``, ``PAM_COLLECTIVE_TIMEOUT``, default 60 s)
so a rank that dies or hangs ends the job with :class:`RankFailure` instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from merging.errors import MergingError

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "PAM_COLLECTIVE_TIMEOUT"
T = TypeVar("T")


class RankFailure(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or disagreed on shapes."""


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched() -> bool:
    """Whether this process is one rank of a torchrun (or torchrun-like) launch."""
    return "RANK" in os.environ and env_world_size() > 1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes artifacts and prints reports."""
    return rank() == 0


def timeout_seconds(value: float | None = None) -> float:
    if value is None:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    if value <= 0:
        raise MergingError("bad_argument", f"the collective timeout must be positive, got {value}")
    return value


def init(device: torch.device, timeout_s: float | None = None) -> torch.device:
    """Join the process group torchrun described (gloo on CPU, NCCL on CUDA); returns this rank's
    device (``cuda:LOCAL_RANK`` when training on CUDA). A no-op outside a launch."""
    if not launched() or is_distributed():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise MergingError("bad_device", f"data parallelism runs on CPU (gloo) or CUDA (NCCL), not {device.type}")
    seconds = timeout_seconds(timeout_s)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except Exception as e:  # rendezvous errors come as RuntimeError/DistError/ValueError variants
        raise RankFailure(f"could not join the process group ({backend}): {type(e).__name__}: {e}") from e
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_COLLECTIVE_SIGNS = ("gloo", "nccl", "connection closed", "timed out", "timeout", "process group", "collective")


def as_rank_failure(e: BaseException) -> RankFailure | None:
    """``e`` as a :class:`RankFailure` if it is a failed collective (DDP's gradient all-reduce raises
    a bare RuntimeError from inside backward), else None."""
    if isinstance(e, RankFailure):
        return e
    dist_error = getattr(dist, "DistError", ())
    text = str(e).lower()
    if (dist_error and isinstance(e, dist_error)) or (
        isinstance(e, RuntimeError) and any(sign in text for sign in _COLLECTIVE_SIGNS)
    ):
        return RankFailure(f"rank {rank()}: a collective failed (another rank died, or hung past the "
                           f"{timeout_seconds():g} s timeout): {e}")
    return None


def _guard(what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except RuntimeError as e:  # DistBackendError, gloo's "Connection closed by peer", timeouts
        raise RankFailure(f"rank {rank()}: {what} failed (another rank died, hung past the "
                          f"{timeout_seconds():g} s timeout, or disagreed): {e}") from e


def barrier() -> None:
    if is_distributed():
        _guard("barrier", dist.barrier)


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (picklable Python objects: decisions, verdicts, layouts)."""
    if not is_distributed():
        return obj
    box = [obj]
    _guard("broadcast of a decision", dist.broadcast_object_list, box, 0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        _guard("all-reduce", dist.all_reduce, t)
    return t


@torch.no_grad()
def sync_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank (in place)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        _guard("weight broadcast", dist.broadcast, t.data, 0)


def agree_net(net: Any) -> Any:
    """Rank 0's multitask network (structure and weights) on every rank: after any step that
    decides structure, so every rank carries on from the same network whatever its own arithmetic
    gave. Same structure: weights are copied in place; otherwise rank 0's network is rebuilt."""
    if not is_distributed():
        return net
    layout = broadcast_object([dict(g) for g in net.layout] if is_main() else None)
    same = bool(layout == [dict(g) for g in net.layout])
    # Every rank must take the same branch: a rank whose structure differs asks for the rebuild.
    flag = torch.tensor([0 if same else 1])
    all_reduce_sum(flag)
    if int(flag) == 0:
        sync_module(net)
        return net
    from merging.network import MultitaskNet

    state = broadcast_object((net.config(), {k: v.detach().cpu() for k, v in net.state_dict().items()})
                             if is_main() else None)
    if is_main() or state is None:
        return net
    rebuilt = MultitaskNet.from_config(state[0])
    rebuilt.load_state_dict(state[1])
    rebuilt.train(net.training)
    return rebuilt


def wrap(module: nn.Module, device: torch.device, find_unused: bool = True) -> nn.Module:
    """DDP around ``module``; buffers (batch-norm statistics) follow rank 0. ``find_unused``: some
    trainable parameter may get no gradient (a combination or a frozen task leaves blocks out of
    the graph); it costs a graph traversal per step, so callers that know better turn it off."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    try:
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)
    except RuntimeError as e:
        raise RankFailure(f"rank {rank()}: DistributedDataParallel set-up failed "
                          f"(ranks disagree on the network, or one died): {e}") from e


# ---------------------------------------------------------------------------- launching
def launch(nproc: int, argv: Sequence[str], timeout_s: float | None = None) -> int:
    """Run ``pam <argv>`` as ``nproc`` ranks on this machine through torchrun's launcher; returns
    the job's exit code (non-zero when any rank failed: torchrun then stops the others)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise MergingError("bad_argument", f"--nproc must be at least 1, got {nproc}")
    os.environ[TIMEOUT_ENV] = str(timeout_seconds(timeout_s))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    args = ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "pam_app", *argv]
    try:
        torchrun.main(args)
    except ChildFailedError as e:
        print(f"pam: a rank failed; the job stopped: {e.format_msg() if hasattr(e, 'format_msg') else e}",
              file=sys.stderr)
        return 3
    return 0


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the ranks must not launch again)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out
