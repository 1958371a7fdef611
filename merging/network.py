"""The multitask network: one block per group per layer, with the wiring rule enforced.

At layer ``l`` the channels are split into *groups*, each keyed by the task set ``S`` (a bit mask,
see ``merging.tasks``) of the tasks it serves. The block of group ``S`` reads only groups ``S'`` of
layer ``l-1`` with ``S' ⊇ S`` (the *wiring rule*), and the head of task ``t`` reads the groups of
the last layer that contain ``t``. Running combination ``C`` therefore needs exactly the groups
whose set meets ``C``, and :meth:`MultitaskNet.for_combination` returns a plain module that runs
only those, holding the very same block modules (so the same parameter storage).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from merging.arch import ArchConfig, resolve
from merging.blocks import INPUT_KEY, AddBlock, GroupBlock, Step, TaskHead, _run_steps
from merging.errors import MergingError, invariant
from merging.graph import GroupGraph, GroupKey, HeadKey, Node, NodeKey
from merging.tasks import TaskSpec, canonical_combination, mask_of, names_of, set_name

FORMAT = "pam-multitask/1"


def is_superset(outer: int, inner: int) -> bool:
    return outer & inner == inner



class CombinationModule(nn.Module):
    """The part of a multitask network one combination runs, as a plain module for export.

    ``forward(x)`` returns one tensor per task of the combination, in sorted task-name order.
    The blocks are the network's own modules, not copies.
    """

    def __init__(self, net: MultitaskNet, combination: tuple[str, ...]) -> None:
        super().__init__()
        self.combination = combination
        self.steps = net.plan(combination)
        needed = [s.key for s in self.steps if not s.head]
        self.blocks = nn.ModuleDict({k: net.blocks[k] for k in needed})
        self.heads = nn.ModuleDict({t: net.heads[t] for t in combination})

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(_run_steps(self.blocks, self.heads, self.steps, x))


class MultitaskNet(nn.Module):
    """A network of per-group blocks with one head per task.

    ``layout[l]`` maps a task-set mask to the width of its group at layer ``l`` (groups of width
    0 are simply absent). ``reads`` may narrow which superset groups a block reads; by default a
    block reads every non-empty superset group of the layer below.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        arch: ArchConfig,
        layout: Sequence[Mapping[int, int]],
        reads: Mapping[tuple[int, int], Sequence[int]] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise MergingError("duplicate_task", f"task names must be unique: {names}")
        if len(layout) != len(arch.layers):
            raise MergingError("bad_layout", f"layout has {len(layout)} layers, architecture {len(arch.layers)}")
        self.tasks: tuple[TaskSpec, ...] = tuple(tasks)
        self.arch = arch
        self.meta: dict[str, Any] = dict(meta or {})
        self.resolved = resolve(arch)
        full = (1 << len(tasks)) - 1
        self.layout: list[dict[int, int]] = []
        for l, groups in enumerate(layout):
            clean: dict[int, int] = {}
            for mask, width in sorted(groups.items()):
                if mask <= 0 or mask & ~full:
                    raise MergingError("bad_layout", f"layer {l}: group mask {mask} is not a task set")
                if width < 0:
                    raise MergingError("bad_layout", f"layer {l}: negative width for group {mask}")
                if width > 0:
                    clean[mask] = int(width)
            self.layout.append(clean)
        self.reads: dict[tuple[int, int], tuple[int, ...]] = {}
        self.blocks = nn.ModuleDict()
        for l, groups in enumerate(self.layout):
            r = self.resolved[l]
            self._check_coupled_layout(l)
            for mask, width in groups.items():
                ins = self._checked_reads(l, mask, None if reads is None else reads.get((l, mask)))
                self.reads[(l, mask)] = ins
                in_ch = self.arch.in_channels if r.source < 0 else sum(self.layout[r.source][m] for m in ins)
                block = AddBlock(r) if r.kind == "add" else GroupBlock(in_ch, width, r)
                self.blocks[GroupKey(l, mask).name] = block
        self.heads = nn.ModuleDict()
        last = len(self.layout) - 1
        for i, t in enumerate(self.tasks):
            ins = self.head_reads(i)
            if not ins:
                raise MergingError("bad_layout", f"task {t.name!r} has no group to read at the last layer")
            in_ch = sum(self.layout[last][m] for m in ins)
            self.heads[t.name] = TaskHead(in_ch, t.out_dim, self.resolved[last].out_hw, arch.head == "avgpool")

    # ----------------------------------------------------------------- structure
    def block(self, layer: int, mask: int) -> GroupBlock:
        """The conv block of a group (an ``add`` layer has none: ask :meth:`module_of`)."""
        block = self.blocks[GroupKey(layer, mask).name]
        invariant(isinstance(block, GroupBlock), f"layer {layer} is an add layer: it has no conv")
        return cast(GroupBlock, block)

    def head(self, task: str) -> TaskHead:
        return cast(TaskHead, self.heads[task])

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise MergingError("unknown_task", f"unknown task {name!r}; known: {', '.join(self.task_names)}")

    def _check_coupled_layout(self, layer: int) -> None:
        """A depthwise or add layer has exactly the groups (and widths) of the layers it reads:
        its channel c is channel c of each input (both ends of an addition carry the same groups)."""
        r = self.resolved[layer]
        for other in (r.source, r.skip) if r.kind in ("dw", "add") else ():
            if other is not None and self.layout[other] != self.layout[layer]:
                raise MergingError(
                    "wiring", f"layer {layer} ({r.kind}) must have the groups and widths of layer {other}: "
                    f"{self._groups_text(layer)} vs {self._groups_text(other)}")

    def _groups_text(self, layer: int) -> str:
        return ", ".join(f"{set_name(m, self.task_names)}:{w}" for m, w in self.layout[layer].items())

    def _checked_reads(self, layer: int, mask: int, explicit: Sequence[int] | None) -> tuple[int, ...]:
        r = self.resolved[layer]
        if r.source < 0:
            return ()
        if r.kind in ("dw", "add"):
            return (mask,)  # the same group of its input(s); the layouts were checked to match
        below = self.layout[r.source]
        if explicit is None:
            ins = tuple(m for m in below if is_superset(m, mask))
        else:
            ins = tuple(sorted(set(explicit)))
            for m in ins:
                if not is_superset(m, mask):
                    raise MergingError(
                        "wiring",
                        f"layer {layer}: group {set_name(mask, self.task_names)} may not read group "
                        f"{set_name(m, self.task_names)} (a group reads only groups of supersets of its task set)",
                    )
                if m not in below:
                    raise MergingError("wiring", f"layer {layer}: reads a group {m} that layer {r.source} lacks")
        if not ins:
            raise MergingError(
                "wiring", f"layer {layer}: group {set_name(mask, self.task_names)} has no superset group to read"
            )
        return ins

    def head_reads(self, task_index: int) -> tuple[int, ...]:
        return tuple(m for m in self.layout[-1] if m >> task_index & 1)

    def input_keys(self, layer: int, mask: int) -> tuple[str, ...]:
        return tuple(k.name for k in self.input_groups(layer, mask)) or (INPUT_KEY,)

    def input_groups(self, layer: int, mask: int) -> tuple[GroupKey, ...]:
        """The groups a block reads, in input order (an add: its two addends); () reads the image."""
        r = self.resolved[layer]
        if r.source < 0:
            return ()
        if r.kind == "add":
            invariant(r.skip is not None, "an add layer has a skip")
            return (GroupKey(r.source, mask), GroupKey(cast(int, r.skip), mask))
        return tuple(GroupKey(r.source, m) for m in self.reads[(layer, mask)])

    def plan(self, combination: Iterable[str] | str | None = None) -> list[Step]:
        combo = self.resolve_combination(combination)
        cmask = mask_of(combo, self.task_names)
        steps: list[Step] = []
        for l, groups in enumerate(self.layout):
            for mask in groups:
                if mask & cmask:
                    add = self.resolved[l].kind == "add"
                    steps.append(Step(GroupKey(l, mask).name, self.input_keys(l, mask), False, add))
        last = len(self.layout) - 1
        for name in combo:
            i = self.task_names.index(name)
            steps.append(Step(name, tuple(GroupKey(last, m).name for m in self.head_reads(i)), True))
        return steps

    def resolve_combination(self, combination: Iterable[str] | str | None) -> tuple[str, ...]:
        if combination is None:
            return tuple(sorted(self.task_names))
        return canonical_combination(combination, self.task_names)

    # ----------------------------------------------------------------- running
    def forward(self, x: Tensor, combination: Iterable[str] | str | None = None) -> dict[str, Tensor]:
        combo = self.resolve_combination(combination)
        outs = _run_steps(self.blocks, self.heads, self.plan(combo), x)
        return dict(zip(combo, outs, strict=True))

    def for_combination(self, combination: Iterable[str] | str | None = None) -> CombinationModule:
        return CombinationModule(self, self.resolve_combination(combination))

    # ----------------------------------------------------------------- surgery
    def group_width(self, layer: int, mask: int) -> int:
        return self.layout[layer].get(mask, 0)

    def graph(self) -> GroupGraph:
        """The group graph of the current structure (a snapshot: ask again after surgery)."""
        nodes: list[Node] = []
        widths: dict[GroupKey, int] = {}
        for l, groups in enumerate(self.layout):
            r = self.resolved[l]
            for mask, width in groups.items():
                key = GroupKey(l, mask)
                widths[key] = width
                ins = self.input_groups(l, mask)
                in_ch = self.arch.in_channels if r.source < 0 else width if r.kind == "add" else sum(
                    widths[k] for k in ins)
                kind = "fc" if r.fc else r.kind
                nodes.append(Node(key, kind, ins, in_ch, width, r.kernel, r.conv_hw,  # type: ignore[arg-type]
                                  width if r.kind == "dw" else 1))
        last = len(self.layout) - 1
        for i, t in enumerate(self.tasks):
            ins = tuple(GroupKey(last, m) for m in self.head_reads(i))
            kernel = (1, 1) if self.arch.head == "avgpool" else self.resolved[last].out_hw
            nodes.append(Node(HeadKey(i, t.name), "head", ins, sum(widths[k] for k in ins), t.out_dim, kernel,
                              (1, 1)))
        return GroupGraph(nodes, widths)

    def module_of(self, key: NodeKey) -> GroupBlock | AddBlock | TaskHead:
        """The block or head named by a graph key."""
        if isinstance(key, HeadKey):
            return cast(TaskHead, self.heads[key.task])
        return cast(GroupBlock | AddBlock, self.blocks[key.name])

    def conv_of(self, key: NodeKey) -> nn.Conv2d:
        module = self.module_of(key)
        invariant(not isinstance(module, AddBlock), f"{key} is an add: it has no conv")
        return cast(GroupBlock | TaskHead, module).conv

    @torch.no_grad()
    def select_channels(self, layer: int, mask: int, keep: Sequence[int] | Tensor) -> None:
        """Keep only channels ``keep`` of group (layer, mask), slicing every reader to match.

        The group's whole pruning unit (the same channels through depthwise convs and additions)
        keeps the same channels. An empty ``keep`` removes the unit; a block left with nothing to
        read is removed in turn (its output would be a constant), and a head left with nothing is
        an error.
        """
        width = self.group_width(layer, mask)
        keep_t = torch.as_tensor(list(keep) if not isinstance(keep, Tensor) else keep, dtype=torch.long)
        if width == 0:
            raise MergingError("bad_group", f"layer {layer} has no group {mask}")
        if keep_t.numel() and (int(keep_t.min()) < 0 or int(keep_t.max()) >= width):
            raise MergingError("bad_group", f"channel index out of range for a group of width {width}")
        graph = self.graph()
        key = GroupKey(layer, mask)
        unit = graph.unit(key)
        readers = graph.input_readers(key)
        if keep_t.numel() == 0:
            for r in readers:
                if isinstance(r.node.key, HeadKey) and all(k in unit for k in r.node.inputs):
                    raise MergingError("empty_task",
                                       f"removing this group would leave task {r.node.key.task!r} with no input")
        for r in readers:
            conv = self.conv_of(r.node.key)
            off = r.offset
            idx = torch.cat([torch.arange(off), off + keep_t, torch.arange(off + width, conv.in_channels)])
            _slice_conv_in(conv, idx)
        if keep_t.numel() == 0:
            for k in unit:
                del self.blocks[k.name]
                del self.layout[k.layer][k.mask]
                del self.reads[(k.layer, k.mask)]
            # Every reader's reads first, then the cascade: the structure must be whole before the
            # next removal asks the graph, and two emptied readers may share one unit.
            emptied: list[GroupKey] = []
            for r in readers:
                if isinstance(r.node.key, GroupKey) and r.node.key not in unit:
                    rk = r.node.key
                    left = tuple(m for m in self.reads[(rk.layer, rk.mask)] if GroupKey(
                        self.resolved[rk.layer].source, m) not in unit)
                    self.reads[(rk.layer, rk.mask)] = left
                    if not left:
                        emptied.append(rk)
            for rk in emptied:
                if rk.mask in self.layout[rk.layer]:  # not gone with an earlier one's unit
                    self.select_channels(rk.layer, rk.mask, [])
            return
        for k in unit:
            block = self.blocks[k.name]
            if isinstance(block, GroupBlock):
                _slice_conv_out(block.conv, block.bn, keep_t)
                if block.conv.groups > 1:  # depthwise: its inputs are the kept channels too
                    block.conv.in_channels = block.conv.groups = int(keep_t.numel())
            self.layout[k.layer][k.mask] = int(keep_t.numel())

    def sync_layout(self) -> None:
        """Re-read group widths from the modules (after an external pruner changed them)."""
        for l, groups in enumerate(self.layout):
            r = self.resolved[l]
            for mask in groups:
                groups[mask] = self.layout[r.source][mask] if r.kind == "add" else self.block(l, mask).conv.out_channels
        self.check_wiring()

    def check_wiring(self) -> None:
        """Raise if any block's input width or read set breaks the wiring rule."""
        for l, groups in enumerate(self.layout):
            r = self.resolved[l]
            self._check_coupled_layout(l)
            for mask in groups:
                for m in self.reads[(l, mask)]:
                    if not is_superset(m, mask) or (r.source >= 0 and m not in self.layout[r.source]):
                        raise MergingError("wiring", f"layer {l}: group {mask} reads group {m}")
        for node in self.graph():
            if node.kind == "add":
                continue
            conv = self.conv_of(node.key)
            if (conv.in_channels, conv.out_channels, conv.groups) != (node.in_channels, node.out_channels, node.groups):
                raise MergingError("wiring", f"{node.key}: conv of shape {tuple(conv.weight.shape)} (groups "
                                   f"{conv.groups}) where the structure needs {node.in_channels} -> "
                                   f"{node.out_channels} (groups {node.groups})")

    # ----------------------------------------------------------------- persistence
    def config(self) -> dict[str, Any]:
        names = self.task_names
        return {
            "format": FORMAT,
            "tasks": [t.to_json() for t in self.tasks],
            "arch": self.arch.to_json(),
            "layout": [
                [
                    {
                        "set": list(names_of(mask, names)),
                        "width": width,
                        "reads": [list(names_of(m, names)) for m in self.reads[(l, mask)]],
                    }
                    for mask, width in groups.items()
                ]
                for l, groups in enumerate(self.layout)
            ],
            "meta": self.meta,
        }

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> MultitaskNet:
        if cfg.get("format") != FORMAT:
            raise MergingError("bad_config", f"not a {FORMAT} config (format={cfg.get('format')!r})")
        try:
            tasks = [TaskSpec.from_json(t) for t in cfg["tasks"]]
            names = [t.name for t in tasks]
            arch = ArchConfig.from_json(cfg["arch"])
            layout: list[dict[int, int]] = []
            reads: dict[tuple[int, int], list[int]] = {}
            for l, groups in enumerate(cfg["layout"]):
                layer: dict[int, int] = {}
                for g in groups:
                    mask = mask_of(g["set"], names)
                    layer[mask] = int(g["width"])
                    if l > 0:
                        reads[(l, mask)] = [mask_of(r, names) for r in g["reads"]]
                layout.append(layer)
        except (KeyError, TypeError, ValueError) as e:
            raise MergingError("bad_config", f"malformed network config: {e}") from e
        return MultitaskNet(tasks, arch, layout, reads=reads, meta=cfg.get("meta") or {})

    @staticmethod
    def single_task(task: TaskSpec, arch: ArchConfig) -> MultitaskNet:
        """A plain single-task network of ``arch``: one group per layer."""
        return MultitaskNet([task], arch, [{1: s.width} for s in arch.layers], meta={"kind": "single"})


def _slice_conv_out(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, keep: Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.data[keep].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.data[keep].clone())
    conv.out_channels = int(keep.numel())
    if bn is not None:
        bn.weight = nn.Parameter(bn.weight.data[keep].clone())
        bn.bias = nn.Parameter(bn.bias.data[keep].clone())
        invariant(bn.running_mean is not None and bn.running_var is not None, "BN keeps running stats")
        bn.running_mean = bn.running_mean[keep].clone()  # type: ignore[index]
        bn.running_var = bn.running_var[keep].clone()  # type: ignore[index]
        bn.num_features = int(keep.numel())


def _slice_conv_in(conv: nn.Conv2d, keep: Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.data[:, keep].clone())
    conv.in_channels = int(keep.numel())
