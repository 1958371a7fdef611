"""A zipped network as a MultitaskNet: value classes, one channel per (neuron, class), MACs bound.

A neuron computes one value for several of its tasks only if they read the same inputs with the
same values. The *value classes* of a neuron partition its task set accordingly, found as the
coarsest partition that is stable: start from one class per neuron, split a class wherever its
tasks read different classes below (a depthwise conv: its own channel's; an addition: both
addends'), and give every member of a pruning unit the common refinement of its members' classes,
because a depthwise conv and an addition must carry exactly the groups of what they read (the
network's wiring rule). Units can form cycles (a residual stage's unit is read by a block's first
conv, which its second conv reads back), so this repeats until nothing splits; splitting only
refines, so it stops. By induction over execution order, tasks in one class compute equal
values.

``to_multitask`` then emits one channel per (neuron, class) in the group of that class's task
set: a zipped neuron whose inputs are all truly shared becomes one shared channel; one with
task-specific inputs becomes one copy (same shared weights) per class. That keeps the wiring rule
and makes the MACs per combination MTZ's real cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from merging.blocks import GroupBlock, TaskHead
from merging.errors import invariant
from merging.network import MultitaskNet

if TYPE_CHECKING:
    from merging.mergers._zipnet import ZippedNet

DENSE = ("conv", "fc")
Classes = list[list[dict[int, int]]]  # per layer, per neuron: task -> class mask


def _block(net: MultitaskNet, layer: int, mask: int) -> GroupBlock:
    return cast(GroupBlock, net.block(layer, mask))


def _head(net: MultitaskNet, task: str) -> TaskHead:
    return cast(TaskHead, net.heads[task])


def _bits(mask: int) -> list[int]:
    return [t for t in range(mask.bit_length()) if mask >> t & 1]


def _refined(z: ZippedNet, layer: int, cls: Classes) -> list[dict[int, int]]:
    """Layer ``layer``'s classes split by what each task reads."""
    ins, kind = z.inputs[layer], z.kinds[layer]
    per_task: dict[int, tuple[tuple[int, int], ...]] = {}
    if ins and kind in DENSE:  # a dense neuron reads every input neuron its task runs
        below = cls[ins[0]]
        per_task = {t: tuple((m, c[t]) for m, c in enumerate(below) if t in c) for t in range(len(z.tasks))}
    out: list[dict[int, int]] = []
    for n, c in enumerate(cls[layer]):
        by_sig: dict[tuple[object, ...], int] = {}
        for t in sorted(c):
            if not ins:
                sig: tuple[object, ...] = ()
            elif kind in DENSE:
                sig = per_task[t]
            else:  # depthwise or addition: its own channel in what it reads
                sig = tuple(cls[i][n][t] for i in ins)
            key = (c[t], sig)
            by_sig[key] = by_sig.get(key, 0) | 1 << t
        out.append({t: m for m in by_sig.values() for t in _bits(m)})
    return out


def _meet_units(z: ZippedNet, cls: Classes) -> None:
    """Every member of a unit gets the common refinement of its members' classes, neuron by neuron."""
    for unit in z.units:
        if len(unit) == 1:
            continue
        for n in range(len(z.sets[unit[0]])):
            by_sig: dict[tuple[int, ...], int] = {}
            for t in sorted(cls[unit[0]][n]):
                key = tuple(cls[l][n][t] for l in unit)
                by_sig[key] = by_sig.get(key, 0) | 1 << t
            joint = {t: m for m in by_sig.values() for t in _bits(m)}
            for l in unit:
                cls[l][n] = dict(joint)


def value_classes(z: ZippedNet) -> list[list[list[int]]]:
    """Per layer, per neuron: the task sets (masks) that see one common value of it."""
    cls: Classes = [[{t: s for t in _bits(s)} for s in sets] for sets in z.sets]
    while True:
        before = [[dict(c) for c in layer] for layer in cls]
        for l in range(len(cls)):
            cls[l] = _refined(z, l, cls)
        _meet_units(z, cls)
        if cls == before:
            break
    return [[sorted(set(c.values())) for c in layer] for layer in cls]


def distinct_product_macs(z: ZippedNet, combination: int) -> int:
    """Trunk MACs of a combination (mask) if every distinct (neuron, input value) product were
    computed once, even inside a neuron whose sum differs per task.

    A lower bound for any implementation of this zipped network, e.g. a kernel that computes
    the shared-weight partial sum once and adds each task's own part; the per-group blocks of
    :func:`to_multitask` recompute such a neuron's shared part per task. Kept to show how
    much that costs MTZ (one layer's worth at most: the partial sums are shared only where
    the inputs are).
    """
    classes = value_classes(z)
    total = 0
    for l, sets in enumerate(z.sets):
        r, ins, kind = z.resolved[l], z.inputs[l], z.kinds[l]
        if kind == "add":  # element-wise sums are not multiply-accumulates
            continue
        per_product = r.kernel[0] * r.kernel[1] * r.conv_hw[0] * r.conv_hw[1]
        for n, s in enumerate(sets):
            tasks = [t for t in range(len(z.tasks)) if (s & combination) >> t & 1]
            if not ins:
                products = z.arch.in_channels if tasks else 0
            elif kind == "dw":  # one product per distinct value of its own input channel
                products = len({c for t in tasks for c in classes[ins[0]][n] if c >> t & 1})
            else:
                below = classes[ins[0]]
                products = len({(m, c) for t in tasks for m, cs in enumerate(below) for c in cs if c >> t & 1})
            total += products * per_product
    return total


def _write_affine(block: GroupBlock, w: Tensor, b: Tensor) -> None:
    """A folded neuron (weight, bias) into a block; BN becomes identity plus bias."""
    block.conv.weight.copy_(w)
    if block.bn is not None:
        bn = block.bn
        bn.weight.fill_(1.0)
        bn.bias.copy_(b)
        cast(Tensor, bn.running_mean).zero_()
        cast(Tensor, bn.running_var).fill_(1.0 - bn.eps)
    else:
        cast(Tensor, block.conv.bias).copy_(b)


@torch.no_grad()
def to_multitask(z: ZippedNet, meta: dict[str, object] | None = None) -> MultitaskNet:
    """The equivalent MultitaskNet: one channel per (neuron, value class), in the class's group."""
    classes = value_classes(z)
    members: list[dict[int, list[int]]] = []  # per layer: group mask -> neurons, in order
    for layer_classes in classes:
        groups: dict[int, list[int]] = {}
        for n, cs in enumerate(layer_classes):
            for c in cs:
                groups.setdefault(c, []).append(n)
        members.append(dict(sorted(groups.items())))
    layout = [{m: len(ns) for m, ns in g.items()} for g in members]
    net = MultitaskNet(z.tasks, z.arch, layout, meta=meta)
    for l, groups in enumerate(members):
        ins, kind = z.inputs[l], z.kinds[l]
        if kind == "add":
            continue
        for mask, neurons in groups.items():
            idx = torch.tensor(neurons, dtype=torch.long)
            w = z.weights[l].data[idx]
            if ins and kind in DENSE:
                reads = net.reads[(l, mask)]
                cols = torch.tensor([m for g in reads for m in members[ins[0]][g]], dtype=torch.long)
                invariant(len(set(cols.tolist())) == len(cols), "a channel reads each input neuron once")
                w = w[:, cols]
            _write_affine(_block(net, l, mask), w, z.biases[l].data[idx])
    last = members[-1]
    for i, t in enumerate(z.tasks):
        cols = torch.tensor([m for g in net.head_reads(i) for m in last[g]], dtype=torch.long)
        head = _head(net, t.name).conv
        head.weight.copy_(z.head_w[t.name].data[:, cols])
        cast(Tensor, head.bias).copy_(z.head_b[t.name].data)
    net.eval()
    return net
