"""Lowering a multitask network to one ExecuTorch program, method by method, over several processes.

``to_edge_transform_and_lower({name: program, ...})`` lowers its methods one after another, and
each costs seconds of fixed work (decompositions, a dozen XNNPACK passes that each retrace the
graph) however small the network. Two things cut that:

- the export and edge conversion are done once per process, for the union of the requested tasks,
  and each method's edge program is cut out of it (``mobile_export.slicing``); only the XNNPACK
  partition, lowering and emission run per method;
- every method is independent until emission, so this module lowers and emits each method on its
  own (in this process or in worker processes) and merges the emitted single-method programs into
  one, the way ExecuTorch's own emitter would have:

  - execution plans in sorted method-name order (``emit_program`` sorts them);
  - delegate blobs stored once, deduplicated by sha256, numbered in order of first use;
  - constant tensors (not delegated) stored once, numbered in order of first use;
  - named data (XNNPACK's weights, keyed by content hash) merged in the order of the methods
    given (``EdgeProgramManager`` collects it in dict order), so shared weights are stored once.

The result is byte-identical to the single ``to_edge_transform_and_lower`` + ``to_executorch``
call (``lower_serial``); ``tests/test_export_lowering.py`` checks that, and the outputs of every
method through the runtime.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mobile_export.capture import compile_config

if TYPE_CHECKING:
    from merging.network import MultitaskNet
    from mobile_export.slicing import EdgeBase

WORKER_MARK = "PAM-LOWERED "  # a worker's line per finished method: MARK name path


@dataclass
class LoweredMethod:
    """One method, emitted on its own: a single-plan ExecuTorch ``Program`` and its named data."""

    name: str
    program: Any  # executorch.exir.schema.Program with one execution plan
    named_data: Any  # NamedDataStoreOutput (buffers + key -> buffer index), or None
    export_s: float = 0.0  # torch.export wall time (of the base: only on the method that built it)
    edge_s: float = 0.0  # the base's edge conversion wall time (idem)
    lower_s: float = 0.0  # cutting the method out of the base, XNNPACK partition and lowering: wall time
    emit_s: float = 0.0  # to_executorch (passes, memory planning, emission) wall time


def lower_serial(programs: dict[str, Any], check_ir: bool = True) -> bytes:
    """ExecuTorch's own one-call lowering of every method together (``programs``: name -> ``torch.export``
    program): what ``merge_methods`` must reproduce byte for byte, and the old export path
    ``export_phases`` times."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    kw = {} if check_ir else {"compile_config": compile_config()}
    edge = to_edge_transform_and_lower(dict(programs), partitioner=[XnnpackPartitioner()], **kw)
    return bytes(edge.to_executorch().buffer)


def lower_method(
    net: MultitaskNet, combo: Sequence[str], max_batch: int, base: EdgeBase | None = None
) -> LoweredMethod:
    """Lower (XNNPACK) and emit one combination as a single-method program, cut out of ``base``
    (the edge program of a combination containing it; made here for ``combo`` alone if not given)."""
    import time

    from mobile_export.slicing import EdgeBase, lower_edge, method_program

    name = "+".join(combo)
    built = base is None
    if base is None:
        base = EdgeBase.build(net, combo, max_batch)
    t0 = time.perf_counter()
    edge = lower_edge(name, method_program(base, combo), base.config)
    t1 = time.perf_counter()
    et = edge.to_executorch()
    t2 = time.perf_counter()
    out = et._emitter_output
    if out.mutable_data is not None or out.external_constant_map:
        raise RuntimeError(f"method {name}: mutable or external data is not supported by the merge")
    named = edge._named_data_store.get_named_data_store_output()
    return LoweredMethod(name, out.program, named, base.export_s if built else 0.0, base.edge_s if built else 0.0,
                         t1 - t0, t2 - t1)


class _Lowerer:
    """Lowers methods in one process, all cut out of one base built on the first call."""

    def __init__(self, net: MultitaskNet, tasks: Sequence[str], max_batch: int) -> None:
        self.net, self.tasks, self.max_batch = net, tuple(tasks), max_batch
        self.base: EdgeBase | None = None

    def lower(self, combo: Sequence[str]) -> LoweredMethod:
        if self.base is not None:
            return lower_method(self.net, combo, self.max_batch, self.base)
        from mobile_export.slicing import EdgeBase

        self.base = EdgeBase.build(self.net, self.tasks, self.max_batch)
        m = lower_method(self.net, combo, self.max_batch, self.base)
        m.export_s, m.edge_s = self.base.export_s, self.base.edge_s  # the base's cost, counted once
        return m


# ---------------------------------------------------------------------------- merge
def merge_methods(methods: Sequence[LoweredMethod]) -> bytes:
    """One program from single-method programs, as ``emit_program`` + ``serialize_for_executorch``
    would have built it from all methods at once. ``methods`` in the order the caller would have
    put them in the ``to_edge_transform_and_lower`` dict (it decides the named-data order)."""
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir._serialize._serialize import serialize_for_executorch
    from executorch.exir.capture._config import ExecutorchBackendConfig
    from executorch.exir.emit._emit_program import EmitterOutput
    from executorch.exir.schema import Buffer, DataLocation, Program, SubsegmentOffsets, Tensor
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorConfig, FlatTensorSerializer

    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate methods in {names}")
    plans = []
    delegate_data: list[Any] = []
    delegate_index: dict[str, int] = {}
    constants: list[Any] = [Buffer(storage=b"")]  # index 0 is reserved: "no constant data"
    constant_index: dict[bytes, int] = {}
    for m in sorted(methods, key=lambda m: m.name):  # emit_program emits in sorted name order
        prog = m.program
        if len(prog.execution_plan) != 1:
            raise ValueError(f"method {m.name}: expected one execution plan, got {len(prog.execution_plan)}")
        plan = copy.deepcopy(prog.execution_plan[0])
        for d in plan.delegates:
            if d.processed.location != DataLocation.INLINE:
                raise ValueError(f"method {m.name}: delegate data not inline")
            blob = prog.backend_delegate_data[d.processed.index].data
            key = hashlib.sha256(blob).hexdigest()
            if key not in delegate_index:
                delegate_index[key] = len(delegate_data)
                delegate_data.append(prog.backend_delegate_data[d.processed.index])
            d.processed.index = delegate_index[key]
        for v in plan.values:
            t = v.val
            if isinstance(t, Tensor) and t.data_buffer_idx > 0:
                storage = bytes(prog.constant_buffer[t.data_buffer_idx].storage)
                if storage not in constant_index:
                    constant_index[storage] = len(constants)
                    constants.append(prog.constant_buffer[t.data_buffer_idx])
                t.data_buffer_idx = constant_index[storage]
        plans.append(plan)
    version = methods[0].program.version
    program = Program(
        version=version,
        execution_plan=plans,
        constant_buffer=constants,
        backend_delegate_data=delegate_data,
        segments=[],
        constant_segment=SubsegmentOffsets(segment_index=0, offsets=[]),
        mutable_data_segments=None,
    )
    store = NamedDataStore()
    for m in methods:
        if m.named_data is not None:
            store.merge_named_data_store(m.named_data)
    emitted = EmitterOutput(
        debug_handle_map={}, method_to_delegate_debug_id_map={}, instruction_id_to_num_outs_map={},
        program=program, mutable_data=None,
        external_constant_buffer=[], external_constant_map={},
    )
    config = ExecutorchBackendConfig()
    serializer = FlatTensorSerializer(FlatTensorConfig(segment_alignment=config.segment_alignment))
    pte, _ = serialize_for_executorch(emitted, config, serializer, store.get_named_data_store_output())
    return bytes(pte)


# ---------------------------------------------------------------------------- workers
class _Worker:
    """A child process that lowers the methods it is handed on stdin, one per line, and answers
    ``PAM-LOWERED name path`` with the pickled :class:`LoweredMethod` at ``path``."""

    def __init__(self, model_json: Path, max_batch: int, scratch: Path, base: Sequence[str], log_file: Any) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "mobile_export.lowering", str(model_json), str(max_batch), str(scratch),
               "+".join(base)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                     text=True, env=env, bufsize=1)

    def lower(self, combo: Sequence[str]) -> LoweredMethod:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        name = "+".join(combo)
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(WORKER_MARK):
                got, path = line[len(WORKER_MARK):].rstrip("\n").split(" ", 1)
                if got != name:
                    raise RuntimeError(f"lowering worker answered {got!r} for {name!r}")
                with open(path, "rb") as f:  # written by our own child in our own private directory
                    method: LoweredMethod = pickle.load(f)
                os.unlink(path)
                return method
        raise RuntimeError(f"lowering worker exited (code {self.proc.wait()}) while lowering {name}")

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def default_workers() -> int:
    """One process per available core (this one included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def lower_methods(
    net: MultitaskNet,
    combos: Sequence[tuple[str, ...]],
    max_batch: int,
    workers: int = 1,
    on_done: Callable[[LoweredMethod], None] | None = None,
    log_file: Any = None,
) -> list[LoweredMethod]:
    """Every combination lowered and emitted on its own, in ``combos`` order (merge them with
    :func:`merge_methods`).

    Every process cuts its methods out of one base (the union of the tasks of ``combos``), which it
    exports and converts once. With ``workers > 1``, ``workers - 1`` child processes lower methods
    alongside this one; each takes the next method not yet started, so a slow method does not hold
    up the others."""
    from merging.checkpoint import save_model
    from mobile_export.slicing import base_tasks

    base = base_tasks(combos)

    done: dict[str, LoweredMethod] = {}
    pending = list(combos)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def take() -> tuple[str, ...] | None:
        with lock:
            return pending.pop(0) if pending and not errors else None

    def finish(m: LoweredMethod) -> None:
        with lock:
            done[m.name] = m
            if on_done is not None:
                on_done(m)

    n_children = min(max(0, workers - 1), max(0, len(combos) - 1))
    with tempfile.TemporaryDirectory(prefix="pam-lower-") as d:
        threads: list[threading.Thread] = []
        children: list[_Worker] = []
        if n_children:
            model_json = save_model(net, Path(d) / "net")
            for i in range(n_children):
                w = _Worker(model_json, max_batch, Path(d), base,
                            log_file if log_file is not None else subprocess.DEVNULL)
                children.append(w)

                def feed(w: _Worker = w) -> None:
                    try:
                        while (c := take()) is not None:
                            finish(w.lower(c))
                    except BaseException as e:  # reported by the main thread
                        with lock:
                            errors.append(e)

                t = threading.Thread(target=feed, name=f"pam-lower-{i}", daemon=True)
                t.start()
                threads.append(t)
        try:
            own = _Lowerer(net, base, max_batch)
            while (c := take()) is not None:
                finish(own.lower(c))
        except BaseException as e:
            with lock:
                errors.append(e)
        finally:
            for t in threads:
                t.join()
            for w in children:
                w.close()
        if errors:
            raise errors[0]
    return [done["+".join(c)] for c in combos]


def _worker_main(model_json: str, max_batch: int, scratch: str, base: str) -> int:
    from merging.checkpoint import load_model

    torch.set_num_threads(1)
    net = load_model(model_json).eval()
    lowerer = _Lowerer(net, tuple(base.split("+")), max_batch)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        m = lowerer.lower(tuple(name.split("+")))
        fd, path = tempfile.mkstemp(prefix="method-", suffix=".pkl", dir=scratch)
        with os.fdopen(fd, "wb") as f:
            pickle.dump(m, f, protocol=pickle.HIGHEST_PROTOCOL)
        print(f"{WORKER_MARK}{name} {path}", flush=True)
    return 0


if __name__ == "__main__":
    from mobile_export import lowering  # pickle by the importable module's class, not __main__'s

    sys.exit(lowering._worker_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
