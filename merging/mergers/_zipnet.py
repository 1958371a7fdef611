"""The zipped network as MTZ sees it: neurons with task sets and one weight per (neuron, input).

Every layer holds neurons; neuron ``n`` serves the tasks of its set ``S_n`` and has one weight
``W[n, m]`` per neuron ``m`` of the layer below, used by every task in ``S_n ∩ S_m``. Task ``t``
runs the neurons with ``t ∈ S_n``, each reading the neurons below with ``t ∈ S_m``. So a zipped
neuron (``S = {A, B}``) has shared weights on zipped inputs and task-specific weights on the
unzipped inputs below (MTZ's "inter" weights), and weights stay tied during retraining.

Such a neuron computes one value for all its tasks only if they read exactly the same inputs
with the same values. :meth:`ZippedNet.to_multitask` works out these *value classes* layer by
layer and emits one channel per (neuron, class) in the group of that class's task set: a zipped
neuron whose inputs are all truly shared becomes one shared channel; one with task-specific
inputs becomes one copy (same shared weights) per class, because it must be computed per task.
That keeps the foundation's wiring rule and makes the MACs per combination MTZ's real cost.

BatchNorm (eval statistics) is folded into the convolution when networks are loaded, so each
neuron is one affine map; ``to_multitask`` writes BN layers as identity plus bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from merging.arch import ArchConfig, resolve
from merging.errors import invariant
from merging.network import GroupBlock, MultitaskNet, TaskHead
from merging.tasks import TaskSpec


def _block(net: MultitaskNet, layer: int, mask: int) -> GroupBlock:
    return cast(GroupBlock, net.block(layer, mask))


def _head(net: MultitaskNet, task: str) -> TaskHead:
    return cast(TaskHead, net.heads[task])


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
    """Neurons with task sets (bit masks over ``tasks``), per-task forward passes, tied weights."""

    def __init__(self, tasks: Sequence[TaskSpec], arch: ArchConfig) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.arch = arch
        self.resolved = resolve(arch)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.sets: list[list[int]] = []
        self.head_w = nn.ParameterDict()
        self.head_b = nn.ParameterDict()

    @staticmethod
    def union(nets: Sequence[MultitaskNet]) -> ZippedNet:
        """The block-diagonal union of single-task networks: nothing zipped yet."""
        tasks = [net.tasks[0] for net in nets]
        z = ZippedNet(tasks, nets[0].arch)
        n_layers = len(nets[0].layout)
        offsets = [0] * len(nets)  # where each net's neurons start in the layer below
        for l in range(n_layers):
            parts = [_folded(_block(net, l, next(iter(net.layout[l])))) for net in nets]
            widths = [w.shape[0] for w, _ in parts]
            total_in = nets[0].arch.in_channels if l == 0 else len(z.sets[l - 1])
            kh, kw = parts[0][0].shape[2:]
            weight = torch.zeros(sum(widths), total_in, kh, kw)
            row = 0
            for i, (w, _) in enumerate(parts):
                cols = slice(None) if l == 0 else slice(offsets[i], offsets[i] + w.shape[1])
                weight[row : row + widths[i], cols] = w
                row += widths[i]
            z.weights.append(nn.Parameter(weight))
            z.biases.append(nn.Parameter(torch.cat([b for _, b in parts])))
            z.sets.append([1 << i for i, w in enumerate(widths) for _ in range(w)])
            offsets = [sum(widths[:i]) for i in range(len(nets))]
        total = len(z.sets[-1])
        for i, net in enumerate(nets):
            conv = _head(net, tasks[i].name).conv
            hw = torch.zeros(conv.out_channels, total, conv.kernel_size[0], conv.kernel_size[1])
            hw[:, offsets[i] : offsets[i] + conv.in_channels] = conv.weight.detach()
            z.head_w[tasks[i].name] = nn.Parameter(hw)
            invariant(conv.bias is not None, "heads have a bias")
            z.head_b[tasks[i].name] = nn.Parameter(cast(Tensor, conv.bias).detach().clone())
        return z

    # ----------------------------------------------------------------- running
    def rows(self, layer: int, task: int) -> Tensor:
        return torch.tensor([n for n, s in enumerate(self.sets[layer]) if s >> task & 1], dtype=torch.long)

    def _layer(self, l: int, h: Tensor, task: int, cols: Tensor | None) -> tuple[Tensor, Tensor]:
        r = self.resolved[l]
        rows = self.rows(l, task)
        w = self.weights[l][rows]
        if cols is not None:
            w = w[:, cols]
        h = nn.functional.conv2d(h, w, self.biases[l][rows], stride=r.stride, padding=r.padding)
        h = torch.relu(h)
        if r.pool > 1:
            h = nn.functional.max_pool2d(h, r.pool)
        return h, rows

    def forward_task(self, x: Tensor, task: int) -> Tensor:
        h, cols = x, None
        for l in range(len(self.sets)):
            h, cols = self._layer(l, h, task, cols)
        name = self.tasks[task].name
        invariant(cols is not None, "a network has at least one layer")
        w = self.head_w[name][:, cols]
        return nn.functional.conv2d(h, w, self.head_b[name]).flatten(1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {t.name: self.forward_task(x, i) for i, t in enumerate(self.tasks)}

    @torch.no_grad()
    def layer_input(self, x: Tensor, task: int, layer: int) -> Tensor:
        """What task ``task`` feeds layer ``layer``, spread over all neurons below (zeros where unused)."""
        if layer == 0:
            return x
        h, cols = x, None
        for l in range(layer):
            h, cols = self._layer(l, h, task, cols)
        full = torch.zeros(h.shape[0], len(self.sets[layer - 1]), *h.shape[2:])
        full[:, cols] = h
        return full

    # ----------------------------------------------------------------- zipping
    @torch.no_grad()
    def zip_neurons(
        self, layer: int, pairs: Sequence[tuple[int, int]], weight: Tensor, bias: Tensor, new_bit: int
    ) -> None:
        """Merge neuron ``j`` into neuron ``i`` for each ``(i, j)``: row ``i`` gets ``weight``/``bias``
        and set ``S_i | new_bit``; readers of ``j`` now read ``i``; ``j`` disappears."""
        if not pairs:
            return
        keep_i = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        drop_j = torch.tensor([j for _, j in pairs], dtype=torch.long)
        w = self.weights[layer].data.clone()
        b = self.biases[layer].data.clone()
        w[keep_i] = weight.to(w.dtype)
        b[keep_i] = bias.to(b.dtype)
        sets = list(self.sets[layer])
        for i, _ in pairs:
            sets[i] |= new_bit
        keep = torch.tensor([n for n in range(len(sets)) if n not in set(drop_j.tolist())], dtype=torch.long)
        self.weights[layer] = nn.Parameter(w[keep])
        self.biases[layer] = nn.Parameter(b[keep])
        self.sets[layer] = [sets[n] for n in keep.tolist()]
        # Readers: the rows reading i and those reading j are disjoint task-wise (j's tasks were
        # not in i's set), so the merged column is the sum of the two.
        def merge_cols(m: Tensor) -> Tensor:
            m = m.clone()
            m[:, keep_i] += m[:, drop_j]
            return m[:, keep]

        if layer + 1 < len(self.sets):
            self.weights[layer + 1] = nn.Parameter(merge_cols(self.weights[layer + 1].data))
        else:
            for name in list(self.head_w.keys()):
                self.head_w[name] = nn.Parameter(merge_cols(self.head_w[name].data))

    # ----------------------------------------------------------------- export
    def value_classes(self) -> list[list[list[int]]]:
        """Per layer, per neuron: the task sets (masks) that see one common value of it."""
        out: list[list[list[int]]] = []
        class_of: list[dict[int, int]] = []  # per neuron below: task -> class mask
        for l, sets in enumerate(self.sets):
            layer_classes: list[list[int]] = []
            layer_class_of: list[dict[int, int]] = []
            for s in sets:
                by_sig: dict[tuple[tuple[int, int], ...], int] = {}
                for t in range(len(self.tasks)):
                    if not s >> t & 1:
                        continue
                    sig = () if l == 0 else tuple((m, c[t]) for m, c in enumerate(class_of) if t in c)
                    by_sig[sig] = by_sig.get(sig, 0) | 1 << t
                classes = sorted(by_sig.values())
                layer_classes.append(classes)
                layer_class_of.append({t: c for c in classes for t in range(len(self.tasks)) if c >> t & 1})
            out.append(layer_classes)
            class_of = layer_class_of
        return out

    def distinct_product_macs(self, combination: int) -> int:
        """Trunk MACs of a combination (mask) if every distinct (neuron, input value) product were
        computed once, even inside a neuron whose sum differs per task.

        A lower bound for any implementation of this zipped network, e.g. a kernel that computes
        the shared-weight partial sum once and adds each task's own part; the per-group blocks of
        :meth:`to_multitask` recompute such a neuron's shared part per task. Kept to show how
        much that costs MTZ (one layer's worth at most: the partial sums are shared only where
        the inputs are).
        """
        classes = self.value_classes()
        total = 0
        for l, sets in enumerate(self.sets):
            r = self.resolved[l]
            per_product = r.kernel[0] * r.kernel[1] * r.conv_hw[0] * r.conv_hw[1]
            for s in sets:
                tasks = [t for t in range(len(self.tasks)) if (s & combination) >> t & 1]
                if l == 0:
                    products = self.arch.in_channels if tasks else 0
                else:
                    below = classes[l - 1]
                    products = len(
                        {(m, c) for t in tasks for m, cs in enumerate(below) for c in cs if c >> t & 1}
                    )
                total += products * per_product
        return total

    @torch.no_grad()
    def to_multitask(self, meta: dict[str, object] | None = None) -> MultitaskNet:
        """The equivalent MultitaskNet: one channel per (neuron, value class), in the class's group."""
        classes = self.value_classes()
        members: list[dict[int, list[int]]] = []  # per layer: group mask -> neurons, in order
        for layer_classes in classes:
            groups: dict[int, list[int]] = {}
            for n, cs in enumerate(layer_classes):
                for c in cs:
                    groups.setdefault(c, []).append(n)
            members.append(dict(sorted(groups.items())))
        layout = [{m: len(ns) for m, ns in g.items()} for g in members]
        net = MultitaskNet(self.tasks, self.arch, layout, meta=meta)
        for l, groups in enumerate(members):
            for mask, neurons in groups.items():
                block = _block(net, l, mask)
                idx = torch.tensor(neurons, dtype=torch.long)
                w = self.weights[l].data[idx]
                if l > 0:
                    reads = net.reads[(l, mask)]
                    cols = torch.tensor([m for g in reads for m in members[l - 1][g]], dtype=torch.long)
                    invariant(len(set(cols.tolist())) == len(cols), "a channel reads each input neuron once")
                    w = w[:, cols]
                block.conv.weight.copy_(w)
                b = self.biases[l].data[idx]
                if block.bn is not None:
                    bn = block.bn
                    bn.weight.fill_(1.0)
                    bn.bias.copy_(b)
                    cast(Tensor, bn.running_mean).zero_()
                    cast(Tensor, bn.running_var).fill_(1.0 - bn.eps)
                else:
                    cast(Tensor, block.conv.bias).copy_(b)
        last = members[-1]
        for i, t in enumerate(self.tasks):
            cols = torch.tensor([m for g in net.head_reads(i) for m in last[g]], dtype=torch.long)
            head = _head(net, t.name).conv
            head.weight.copy_(self.head_w[t.name].data[:, cols])
            cast(Tensor, head.bias).copy_(self.head_b[t.name].data)
        net.eval()
        return net
