"""The zipped network as MTZ sees it: neurons with task sets and one weight per (neuron, input).

Every layer holds neurons; neuron ``n`` serves the tasks of its set ``S_n`` and has one weight
``W[n, m]`` per neuron ``m`` of the layer it reads, used by every task in ``S_n ∩ S_m``. Task ``t``
runs the neurons with ``t ∈ S_n``, each reading the input neurons with ``t ∈ S_m``. So a zipped
neuron (``S = {A, B}``) has shared weights on zipped inputs and task-specific weights on the
unzipped inputs below (MTZ's "inter" weights), and weights stay tied during retraining.

Which layer a layer reads comes from the group graph of the single-task networks: a residual
block's first conv reads the block input, an addition sums its two addends channel by channel,
a depthwise conv's neuron ``n`` reads only neuron ``n`` of its source. Depthwise convs and
additions create no channels, so the graph's pruning units (channels coupled through them) are
zipped as one: a zip moves neuron ``n`` in every member at once, and every member of a unit
keeps the same neurons with the same sets.

Such a neuron computes one value for all its tasks only if they read exactly the same inputs
with the same values. :meth:`ZippedNet.to_multitask` (``_zipexport``) works out these *value
classes* and emits one channel per (neuron, class) in the group of that class's task set.

BatchNorm (eval statistics) is folded into the convolution when networks are loaded, so each
neuron is one affine map; ``to_multitask`` writes BN layers as identity plus bias.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from merging.arch import ArchConfig, resolve
from merging.blocks import GroupBlock, activate
from merging.errors import invariant
from merging.graph import GroupKey
from merging.mergers._zipexport import DENSE, _block, _head, distinct_product_macs, to_multitask, value_classes
from merging.network import MultitaskNet
from merging.tasks import TaskSpec


def _folded(block: GroupBlock) -> tuple[Tensor, Tensor]:
    """A GroupBlock's conv (+ eval-mode BN) as one weight and bias."""
    conv = block.conv
    w = conv.weight.detach().clone()
    b = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(conv.out_channels)
    bn = block.bn
    if bn is not None:
        mean, var = bn.running_mean, bn.running_var
        invariant(mean is not None and var is not None, "BN keeps running statistics")
        scale = bn.weight.detach() / torch.sqrt(cast(Tensor, var) + bn.eps)
        w = w * scale.view(-1, 1, 1, 1)
        b = (b - cast(Tensor, mean)) * scale + bn.bias.detach()
    return w, b


class ZippedNet(nn.Module):
    """Neurons with task sets (bit masks over ``tasks``), per-task forward passes, tied weights.

    ``inputs[l]``: the layers layer ``l`` reads (() the image; an addition its two addends);
    ``kinds[l]``: ``conv``, ``fc``, ``dw`` or ``add``; ``units``: the pruning units as layer
    tuples in execution order (their first layer is a dense producer). An addition has no
    weights (an empty parameter keeps the lists aligned with the layers).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        arch: ArchConfig,
        inputs: Sequence[tuple[int, ...]],
        kinds: Sequence[str],
        units: Sequence[tuple[int, ...]],
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.arch = arch
        self.resolved = resolve(arch)
        self.inputs = [tuple(i) for i in inputs]
        self.kinds = list(kinds)
        self.units = [tuple(u) for u in units]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.sets: list[list[int]] = []
        self.head_w = nn.ParameterDict()
        self.head_b = nn.ParameterDict()

    @staticmethod
    def union(nets: Sequence[MultitaskNet]) -> ZippedNet:
        """The block-diagonal union of single-task networks: nothing zipped yet."""
        tasks = [net.tasks[0] for net in nets]
        graph = nets[0].graph()
        n_layers = len(nets[0].layout)
        nodes = [graph[GroupKey(l, 1)] for l in range(n_layers)]
        units = [tuple(k.layer for k in u) for u in graph.units()]
        z = ZippedNet(
            tasks, nets[0].arch, [tuple(k.layer for k in n.inputs) for n in nodes], [n.kind for n in nodes], units
        )
        offsets: list[list[int]] = []  # per layer: where each net's neurons start
        for l in range(n_layers):
            ins, kind = z.inputs[l], z.kinds[l]
            if kind == "add":
                widths = _widths(z.sets[ins[0]], len(nets))
                z.weights.append(nn.Parameter(torch.zeros(0)))
                z.biases.append(nn.Parameter(torch.zeros(0)))
            else:
                parts = [_folded(_block(net, l, 1)) for net in nets]
                widths = [w.shape[0] for w, _ in parts]
                if kind == "dw":  # channel c reads channel c: no cross terms to place
                    weight = torch.cat([w for w, _ in parts])
                else:
                    weight = _block_diagonal(
                        parts,
                        nets[0].arch.in_channels if not ins else len(z.sets[ins[0]]),
                        None if not ins else offsets[ins[0]],
                    )
                z.weights.append(nn.Parameter(weight))
                z.biases.append(nn.Parameter(torch.cat([b for _, b in parts])))
            z.sets.append([1 << i for i, w in enumerate(widths) for _ in range(w)])
            offsets.append([sum(widths[:i]) for i in range(len(nets))])
        total = len(z.sets[-1])
        for i, net in enumerate(nets):
            conv = _head(net, tasks[i].name).conv
            hw = torch.zeros(conv.out_channels, total, conv.kernel_size[0], conv.kernel_size[1])
            hw[:, offsets[-1][i] : offsets[-1][i] + conv.in_channels] = conv.weight.detach()
            z.head_w[tasks[i].name] = nn.Parameter(hw)
            invariant(conv.bias is not None, "heads have a bias")
            z.head_b[tasks[i].name] = nn.Parameter(cast(Tensor, conv.bias).detach().clone())
        return z

    # ----------------------------------------------------------------- structure
    def unit_of(self, layer: int) -> tuple[int, ...]:
        return next(u for u in self.units if layer in u)

    def dense_readers(self, layer: int) -> list[int]:
        """The dense layers that read ``layer`` as input channels (depthwise convs and additions
        read it as their own channels: they are in its unit)."""
        return [r for r, ins in enumerate(self.inputs) if layer in ins and self.kinds[r] in DENSE]

    # ----------------------------------------------------------------- running
    def rows(self, layer: int, task: int) -> Tensor:
        return torch.tensor([n for n, s in enumerate(self.sets[layer]) if s >> task & 1], dtype=torch.long)

    def _layer(self, l: int, x: Tensor, outs: Mapping[int, tuple[Tensor, Tensor]], task: int) -> tuple[Tensor, Tensor]:
        r, kind, ins = self.resolved[l], self.kinds[l], self.inputs[l]
        rows = self.rows(l, task)
        if kind == "add":
            h = outs[ins[0]][0] + outs[ins[1]][0]
        else:
            h_in, cols = (outs[ins[0]][0], outs[ins[0]][1]) if ins else (x, None)
            w = self.weights[l][rows]
            groups = 1
            if kind == "dw":  # the same neurons as its source: rows are its input channels
                groups = len(rows)
            elif cols is not None:
                w = w[:, cols]
            h = nn.functional.conv2d(h_in, w, self.biases[l][rows], stride=r.stride, padding=r.padding, groups=groups)
            if h.device.type == "cpu":
                # From a one-channel input (or an indexed weight) the conv's output comes out NCHW, and the
                # CPU's max-pool on NCHW maps of these sizes is ~10x slower than on channels-last ones.
                h = h.contiguous(memory_format=torch.channels_last)
        h = activate(h, r.act)
        if r.pool > 1:
            h = nn.functional.max_pool2d(h, r.pool, r.pool_stride, r.pool_padding)
        return h, rows

    def _run(self, x: Tensor, task: int, upto: int, keep: Sequence[int]) -> dict[int, tuple[Tensor, Tensor]]:
        """Layers ``0 .. upto-1`` for ``task``; returns the outputs and rows of layers ``keep``. Any
        other output is dropped once its last reader ran (large calibration batches)."""
        last_use = {
            l: max([r for r, ins in enumerate(self.inputs) if l in ins], default=len(self.sets)) for l in range(upto)
        }
        outs: dict[int, tuple[Tensor, Tensor]] = {}
        for l in range(upto):
            outs[l] = self._layer(l, x, outs, task)
            for m in [m for m in outs if m not in keep and last_use[m] <= l]:
                del outs[m]
        return {k: outs[k] for k in keep}

    def forward_task(self, x: Tensor, task: int) -> Tensor:
        last = len(self.sets) - 1
        h, cols = self._run(x, task, last + 1, [last])[last]
        name = self.tasks[task].name
        if self.arch.head == "avgpool":
            h = h.mean((2, 3), keepdim=True)
        w = self.head_w[name][:, cols]
        return nn.functional.conv2d(h, w, self.head_b[name]).flatten(1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t.name: self.forward_task(x, i) for i, t in enumerate(self.tasks)}

    @torch.no_grad()
    def layer_inputs(self, x: Tensor, task: int, layers: Sequence[int]) -> dict[int, Tensor]:
        """What task ``task`` feeds each dense or depthwise layer of ``layers``, spread over all
        neurons of its source (zeros where unused); one forward pass for all of them."""
        sources = sorted({self.inputs[l][0] for l in layers if self.inputs[l]})
        outs = self._run(x, task, sources[-1] + 1, sources) if sources else {}
        full: dict[int, Tensor] = {}
        for src, (h, cols) in outs.items():
            full[src] = torch.zeros(h.shape[0], len(self.sets[src]), *h.shape[2:])
            full[src][:, cols] = h
        return {l: full[self.inputs[l][0]] if self.inputs[l] else x for l in layers}

    def layer_input(self, x: Tensor, task: int, layer: int) -> Tensor:
        return self.layer_inputs(x, task, [layer])[layer]

    # ----------------------------------------------------------------- zipping
    @torch.no_grad()
    def zip_unit(
        self,
        unit: Sequence[int],
        pairs: Sequence[tuple[int, int]],
        merged: Mapping[int, tuple[Tensor, Tensor]],
        new_bit: int,
    ) -> None:
        """Merge neuron ``j`` into neuron ``i`` for each ``(i, j)`` in every layer of ``unit``: row
        ``i`` gets ``merged[layer]`` (weight, bias) and set ``S_i | new_bit``; readers of ``j`` now
        read ``i``; ``j`` disappears."""
        if not pairs:
            return
        keep_i = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        drop_j = torch.tensor([j for _, j in pairs], dtype=torch.long)
        old_i = [self.sets[unit[0]][i] for i, _ in pairs]
        dropped = set(drop_j.tolist())
        keep = torch.tensor([n for n in range(len(self.sets[unit[0]])) if n not in dropped], dtype=torch.long)
        for layer in unit:
            if self.kinds[layer] != "add":
                w = self.weights[layer].data.clone()
                b = self.biases[layer].data.clone()
                w[keep_i] = merged[layer][0].to(w.dtype)
                b[keep_i] = merged[layer][1].to(b.dtype)
                self.weights[layer] = nn.Parameter(w[keep])
                self.biases[layer] = nn.Parameter(b[keep])
            sets = list(self.sets[layer])
            for i, _ in pairs:
                sets[i] |= new_bit
            self.sets[layer] = [sets[n] for n in keep.tolist()]
        # Readers after every member's rows: a reader inside the unit has its new sets already.
        for layer in unit:
            for r in self.dense_readers(layer):
                w = _merge_cols(self.weights[r].data, self.sets[r], keep_i, drop_j, keep, old_i, new_bit)
                self.weights[r] = nn.Parameter(w)
            if layer == len(self.sets) - 1:
                for name in list(self.head_w.keys()):
                    self.head_w[name] = nn.Parameter(
                        _merge_cols(self.head_w[name].data, None, keep_i, drop_j, keep, old_i, new_bit)
                    )

    # ----------------------------------------------------------------- export
    def value_classes(self) -> list[list[list[int]]]:
        return value_classes(self)

    def distinct_product_macs(self, combination: int) -> int:
        """Trunk MACs of a combination (mask) if every distinct (neuron, input value) product were
        computed once, even inside a neuron whose sum differs per task (see ``_zipexport``)."""
        return distinct_product_macs(self, combination)

    def to_multitask(self, meta: dict[str, object] | None = None) -> MultitaskNet:
        """The equivalent MultitaskNet: one channel per (neuron, value class), in the class's group."""
        return to_multitask(self, meta)


def _widths(sets: Sequence[int], n: int) -> list[int]:
    return [sum(1 for s in sets if s == 1 << i) for i in range(n)]


def _block_diagonal(parts: Sequence[tuple[Tensor, Tensor]], total_in: int, offsets: Sequence[int] | None) -> Tensor:
    """The nets' dense weights side by side, each on its own net's input neurons (all of them on the image)."""
    widths = [w.shape[0] for w, _ in parts]
    kh, kw = parts[0][0].shape[2:]
    weight = torch.zeros(sum(widths), total_in, kh, kw)
    row = 0
    for i, (w, _) in enumerate(parts):
        cols = slice(None) if offsets is None else slice(offsets[i], offsets[i] + w.shape[1])
        weight[row : row + widths[i], cols] = w
        row += widths[i]
    return weight


def _merge_cols(
    m: Tensor,
    row_sets: Sequence[int] | None,
    keep_i: Tensor,
    drop_j: Tensor,
    keep: Tensor,
    old_i: Sequence[int],
    new_bit: int,
) -> Tensor:
    """A reader's weights once input ``j`` is merged into input ``i``.

    A row reading ``i`` (tasks of ``S_i``) and one reading ``j`` (the new task) are disjoint
    task-wise, and each holds zero on the other's column, so the merged column is their sum. A
    row zipped already in this step (it serves both: only where units form a cycle, e.g. a
    residual block's second conv, zipped with the stage, reading the first conv) held both
    sides' weights and now needs one: their mean (retraining follows).
    """
    m = m.clone()
    summed = m[:, keep_i] + m[:, drop_j]
    if row_sets is not None:
        rs = torch.tensor(row_sets, dtype=torch.long)[:, None]
        both = (rs & torch.tensor(old_i, dtype=torch.long)[None, :] != 0) & (rs & new_bit != 0)
        if bool(both.any()):
            summed = torch.where(both[:, :, None, None], summed / 2, summed)
    m[:, keep_i] = summed
    return m[:, keep]
