"""The modules a multitask network is made of: a group's conv block, a residual addition, a task's
head, and the step list a combination runs through them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from merging.arch import ResolvedLayer

INPUT_KEY = "input"


def activate(x: Tensor, act: str) -> Tensor:
    if act == "relu":
        return torch.relu(x)
    if act == "relu6":
        return nn.functional.relu6(x)
    return x


class GroupBlock(nn.Module):
    """conv (+ BN) + activation (+ max-pool) for the channels of one group at one layer; a
    depthwise layer's conv has one filter per input channel (``groups`` = width)."""

    def __init__(self, in_ch: int, out_ch: int, layer: ResolvedLayer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_ch, out_ch, layer.kernel, stride=layer.stride, padding=layer.padding, bias=not layer.bn,
            groups=out_ch if layer.kind == "dw" else 1,
        )
        self.bn = nn.BatchNorm2d(out_ch) if layer.bn else None
        self.act = layer.act
        self.pool = layer.pool
        self.pool_stride = layer.pool_stride
        self.pool_padding = layer.pool_padding

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        x = activate(x, self.act)
        if self.pool > 1:
            x = nn.functional.max_pool2d(x, self.pool, self.pool_stride, self.pool_padding)
        return x


class AddBlock(nn.Module):
    """The sum of one group's channels in two layers (a skip connection), then the activation."""

    def __init__(self, layer: ResolvedLayer) -> None:
        super().__init__()
        self.act = layer.act

    def forward(self, x: Tensor) -> Tensor:
        return activate(x, self.act)


class TaskHead(nn.Module):
    """A dense layer over the last feature map (a conv covering it), flattened to (batch, out)."""

    def __init__(self, in_ch: int, out_dim: int, map_hw: tuple[int, int], avgpool: bool = False) -> None:
        super().__init__()
        self.avgpool = avgpool  # global mean first, then a 1x1 conv (a Linear on the pooled features)
        self.conv = nn.Conv2d(in_ch, out_dim, (1, 1) if avgpool else map_hw)

    def forward(self, x: Tensor) -> Tensor:
        if self.avgpool:
            x = x.mean((2, 3), keepdim=True)
        return self.conv(x).flatten(1)


@dataclass(frozen=True)
class Step:
    key: str  # block key, or task name for a head
    inputs: tuple[str, ...]  # keys of the outputs concatenated (in this order) as its input
    head: bool
    add: bool = False  # sum the inputs instead of concatenating them


def _run_steps(blocks: nn.ModuleDict, heads: nn.ModuleDict, steps: Sequence[Step], x: Tensor) -> list[Tensor]:
    outs: dict[str, Tensor] = {INPUT_KEY: x}
    results: list[Tensor] = []
    for step in steps:
        if step.add:
            inp = outs[step.inputs[0]] + outs[step.inputs[1]]
        elif len(step.inputs) == 1:
            inp = outs[step.inputs[0]]
        else:
            inp = torch.cat([outs[k] for k in step.inputs], 1)
        if step.head:
            results.append(heads[step.key](inp))
        else:
            outs[step.key] = blocks[step.key](inp)
    return results
