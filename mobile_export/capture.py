"""What every lowering starts from: the example input, ``torch.export`` of one combination with a
dynamic batch, and the edge compile configuration."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from merging.network import MultitaskNet


def example_input(net: MultitaskNet, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = net.arch.input_size
    return torch.randn(batch, net.arch.in_channels, h, w, generator=g)


def export_method(net: MultitaskNet, combo: Sequence[str], max_batch: int) -> Any:
    """``torch.export`` of one combination, batch dimension dynamic up to ``max_batch``."""
    from torch.export import Dim, export

    net.eval()
    x = example_input(net, min(2, max_batch))  # batch 1 would be specialised
    dyn = {"x": {0: Dim("batch", min=1, max=max_batch)}} if max_batch > 1 else None
    return export(net.for_combination(tuple(combo)).eval(), (x,), dynamic_shapes=dyn, strict=False)


def compile_config() -> Any:
    from executorch.exir import EdgeCompileConfig

    # The IR validity check re-verifies every graph after each pass; it changes nothing in the
    # program (the tests compare bytes with and without) and costs ~13% of the lowering.
    return EdgeCompileConfig(_check_ir_validity=False)
