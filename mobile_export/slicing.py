"""Each method's edge program cut out of one converted program, instead of exported and converted anew.

``to_edge_transform_and_lower`` spends most of a small method's time before the XNNPACK partition:
``torch.export``, then three decomposition passes and a dozen edge passes that each retrace the
graph with fake tensors and a symbolic batch size (measured on the digits demo network: 133 of 201
CPU s for its 31 methods). Every method repeats that on a subgraph of the same network: a
combination runs exactly the steps of the base plan (the union of the requested tasks) whose
group meets it, in the same order (``MultitaskNet.plan``). So :class:`EdgeBase` exports and
converts the base once per process, and :func:`method_program` turns it into one method's edge
program by dropping the other tasks' outputs, the code only they reach and the weights only that
code read, and renumbering the debug handles; only the XNNPACK partition, its passes and the
emission run per method. The lowered method is byte-identical to ExecuTorch's own lowering of the
method alone (``tests/test_export_lowering.py``), and the bundle is still verified method by
method against eager.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mobile_export.capture import compile_config, example_input, export_method

if TYPE_CHECKING:
    from merging.network import MultitaskNet


class _DropToBackendWarning(logging.Filter):
    """XnnpackPartitioner warns when it finds no ``to_edge_transform_and_lower`` frame on the stack;
    :func:`lower_edge` runs that function's own steps (without the conversion it already did), so
    the warning, once per method in export.log, would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "deprecated 'to_edge() + to_backend()'" not in record.getMessage()


_PARTITIONER_LOG = "executorch.backends.xnnpack.partition.xnnpack_partitioner"
_DROP_WARNING = _DropToBackendWarning()  # one instance: adding it again is a no-op


def base_tasks(combos: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The smallest combination that contains every one of ``combos`` (canonical: sorted)."""
    return tuple(sorted({t for c in combos for t in c}))


@dataclass
class EdgeBase:
    """The base combination exported and converted to the edge dialect, once, in this process."""

    net: MultitaskNet
    tasks: tuple[str, ...]
    program: Any  # edge-dialect ExportedProgram of the base, before partitioning
    config: Any  # the EdgeCompileConfig it was converted with (carries the ops kept from decomposition)
    export_s: float  # torch.export wall seconds
    edge_s: float  # edge conversion wall seconds

    @classmethod
    def build(cls, net: MultitaskNet, tasks: Sequence[str], max_batch: int) -> EdgeBase:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir.program._program import _gen_edge_manager_for_partitioners

        tasks = tuple(tasks)
        name = "+".join(tasks)
        t0 = time.perf_counter()
        aten = export_method(net, tasks, max_batch)
        t1 = time.perf_counter()
        config = compile_config()
        # to_edge_transform_and_lower's first step, with the partitioner it lowers with (which ops
        # the conversion keeps depends on it)
        edge = _gen_edge_manager_for_partitioners({name: [XnnpackPartitioner()]}, {name: aten}, config, None)
        program = edge.exported_program(name)
        _trim_provenance(program.graph_module)
        t2 = time.perf_counter()
        logging.getLogger(_PARTITIONER_LOG).addFilter(_DROP_WARNING)
        return cls(net, tasks, program, config, t1 - t0, t2 - t1)


def _trim_provenance(gm: Any) -> None:
    """Each node's provenance (``meta["from_node"]``) cut to the node of the exported graph it came from.

    Every pass that retraces the graph deep-copies each node's whole provenance chain into a new
    entry, so the chain grows by a level per pass; on the base's long chains that copying was 12%
    of the methods' lowering (profiled, digits network). The one thing read from it is the oldest
    ancestor, which ``DebugHandleGeneratorPass`` numbers nodes by (and the debug handles are in
    the XNNPACK blob); that is kept."""
    for node in gm.graph.nodes:
        chain = node.meta.get("from_node")
        if not chain:
            continue
        root = chain[-1]
        while root.from_node:
            root = root.from_node[-1]
        node.meta["from_node"] = [root]


def method_program(base: EdgeBase, combo: Sequence[str]) -> Any:
    """The edge program ``to_edge`` would have made from ``torch.export`` of ``combo`` alone."""
    from executorch.exir.passes.debug_handle_generator_pass import DebugHandleGeneratorPass
    from torch.export import ExportedProgram
    from torch.export.graph_signature import InputKind
    from torch.utils._pytree import tree_flatten

    combo = tuple(combo)
    if not set(combo) <= set(base.tasks):
        raise ValueError(f"combination {combo} is not part of the base {base.tasks}")
    keep = [i for i, t in enumerate(base.tasks) if t in combo]  # both sorted: outputs keep their order
    ep = copy.deepcopy(base.program)  # later passes write into node meta; each method gets its own graph
    gm, sig = ep.graph_module, copy.deepcopy(ep.graph_signature)
    out = gm.graph.output_node()
    outs = out.args[0]
    out.args = (type(outs)(outs[i] for i in keep),)
    sig.output_specs[:] = [sig.output_specs[i] for i in keep]
    gm.graph.eliminate_dead_code()
    module = base.net.for_combination(combo).eval()
    buffers = {name for name, _ in module.named_buffers()}
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    state_dict, constants = dict(ep.state_dict), dict(ep.constants)
    for spec in list(sig.input_specs):
        # as torch.export of the method alone + to_edge: the buffers of the modules it holds, even
        # unused ones (BatchNorm's counter); parameters and constants only if read
        node = placeholders[spec.arg.name]
        kept = spec.target in buffers if spec.kind == InputKind.BUFFER else bool(node.users)
        if kept or spec.kind == InputKind.USER_INPUT:
            continue
        sig.input_specs.remove(spec)
        gm.graph.erase_node(node)
        state_dict.pop(spec.target, None)
        constants.pop(spec.target, None)
    DebugHandleGeneratorPass()(gm)  # numbered from 1 over the remaining nodes, as to_edge numbers them
    gm.recompile()
    # the output tree of the method alone (a tuple of one tensor per task), and the module entries
    # of the modules it holds
    with torch.no_grad():
        _, out_spec = tree_flatten(module(example_input(base.net, 1)))
    held = {name for name, _ in module.named_modules()}
    call_graph = [copy.deepcopy(e) for e in ep.module_call_graph if e.fqn in held]
    root = call_graph[0].signature
    if root is None or call_graph[0].fqn != "":
        raise AssertionError("an exported program's first module call entry is its root")
    root.out_spec = out_spec
    if root.outputs:
        root.outputs[:] = [root.outputs[i] for i in keep]
    return ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=sig, state_dict=state_dict,
        range_constraints=ep.range_constraints, module_call_graph=call_graph,
        example_inputs=ep.example_inputs, constants=constants, verifiers=ep.verifiers,
    )


def lower_edge(name: str, program: Any, config: Any) -> Any:
    """The rest of ``to_edge_transform_and_lower`` for one edge program: the XNNPACK partition and
    lowering, then its check that no op kept from decomposition was left undelegated."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir.program._program import (
        EdgeProgramManager,
        _can_skip_using_EDGE_DO_NOT_DECOMP,
        _remove_invalid_ops_for_not_decompose,
        _sanity_check_graph_for_non_decomp_ops,
    )

    partitioner = XnnpackPartitioner()
    manager = EdgeProgramManager({name: program}, None, config, list(config._core_aten_ops_exception_list))
    lowered = manager.to_backend({name: partitioner})
    program = lowered.exported_program(name)
    ops, check_op_support = partitioner.ops_to_not_decompose(program)
    if not _can_skip_using_EDGE_DO_NOT_DECOMP(partitioner, program):
        ops = _remove_invalid_ops_for_not_decompose(ops)
    _sanity_check_graph_for_non_decomp_ops(name, program, set(ops), check_op_support, generate_error=True,
                                           partitioner_name=type(partitioner).__name__)
    return lowered
