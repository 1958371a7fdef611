"""MTZ's plan for one pruning unit: pair costs, greedy pairs, merged weights of every member.

A unit's neurons are zipped in all its members at once (see ``_zipnet``). The pair cost is the
sum of MTZ's second-order cost over the unit's dense producers (each on the inputs zipped so far
in its own source layer); a chain network's units are single layers, so this is MTZ's layer
cost. Every dense member then gets its pair's merged vector from its own correlations; a
depthwise member, whose neuron reads only its own channel (zipped by this very step, so shared),
gets the same second-order merge on that one channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merging.mergers._hessian import (
    greedy_pairs,
    input_correlation,
    merged_vectors,
    pair_costs,
    vectors_to_weights,
    weight_vectors,
    zip_terms,
)
from merging.mergers._zipnet import DENSE, ZippedNet


@dataclass(frozen=True)
class UnitPlan:
    pairs: list[tuple[int, int]]  # (left neuron, right neuron), in increasing cost
    costs: list[float]
    merged: dict[int, tuple[torch.Tensor, torch.Tensor]]  # per member layer with weights: (K, ...) weight, (K,) bias

    def first(self, k: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The merged weights of the first ``k`` pairs."""
        return {l: (w[:k], b[:k]) for l, (w, b) in self.merged.items()}


@dataclass(frozen=True)
class _DenseTerms:
    """One dense member's pair costs and what merging a pair needs."""

    costs: torch.Tensor  # (left, right)
    vec: torch.Tensor  # every neuron's vector on the shared inputs
    steps: dict[int, torch.Tensor]  # left set -> merge step
    cols: torch.Tensor  # shared input neurons
    per_position: bool


def _dense_terms(
    z: ZippedNet,
    layer: int,
    left: Sequence[int],
    right: Sequence[int],
    new_task: int,
    inputs: Sequence[dict[int, torch.Tensor]],
    damping: float,
) -> _DenseTerms:
    sets = z.sets[layer]
    new_bit, old_mask = 1 << new_task, (1 << new_task) - 1
    # Coordinates both sides share: the input image, or the neurons zipped in this step below.
    ins = z.inputs[layer]
    if not ins:
        shared = list(range(z.arch.in_channels))
    else:
        shared = [m for m, s in enumerate(z.sets[ins[0]]) if s & new_bit and s & old_mask]
    per_position = z.kinds[layer] != "fc"
    cols = torch.tensor(shared, dtype=torch.long)
    corr = [input_correlation(inputs[t][layer][:, cols], per_position) for t in range(new_task + 1)]
    weight, bias = z.weights[layer].detach(), z.biases[layer].detach()
    vec = weight_vectors(weight[:, cols], bias, per_position)
    right_t = torch.tensor(right, dtype=torch.long)
    costs = torch.empty(len(left), len(right), dtype=torch.float64)
    steps: dict[int, torch.Tensor] = {}
    for s in sorted({sets[n] for n in left}):
        # A zipped-so-far neuron serves several tasks: its side's correlation is their mean.
        h_left = torch.stack([corr[t] for t in range(new_task) if s >> t & 1]).mean(0)
        terms = zip_terms(h_left, corr[new_task], damping)
        steps[s] = terms.step
        rows = [i for i, n in enumerate(left) if sets[n] == s]
        costs[rows] = pair_costs(vec[[left[i] for i in rows]], vec[right_t], terms.h_hat)
    return _DenseTerms(costs, vec, steps, cols, per_position)


def _dense_merged(
    z: ZippedNet, layer: int, d: _DenseTerms, pairs: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    sets = z.sets[layer]
    weight, bias = z.weights[layer].detach(), z.biases[layer].detach()
    vec = d.vec
    merged = torch.stack([merged_vectors(vec[i : i + 1], vec[j : j + 1], d.steps[sets[i]])[0] for i, j in pairs])
    w_shared, b_merged = vectors_to_weights(merged, tuple(weight.shape[2:]), d.per_position)  # type: ignore[arg-type]
    ii = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    jj = torch.tensor([j for _, j in pairs], dtype=torch.long)
    # Unzipped inputs keep each side's own weights (they are zero on the other side's inputs).
    w_full = weight[ii] + weight[jj]
    w_full[:, d.cols] = w_shared.to(w_full.dtype)
    return w_full, b_merged.to(bias.dtype)


def _channel_correlations(x: torch.Tensor) -> torch.Tensor:
    """Per channel of ``x`` (B, C, H, W), ``E[[x_c; 1][x_c; 1]^T]`` over batch and pixels: (C, 2, 2)."""
    x = x.detach().to(torch.float64)
    m1, m2 = x.mean((0, 2, 3)), (x * x).mean((0, 2, 3))
    return torch.stack([torch.stack([m2, m1], 1), torch.stack([m1, torch.ones_like(m1)], 1)], 1)


@torch.no_grad()
def _depthwise_merged(
    z: ZippedNet,
    layer: int,
    pairs: Sequence[tuple[int, int]],
    new_task: int,
    inputs: Sequence[dict[int, torch.Tensor]],
    damping: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    sets = z.sets[layer]
    corr = [_channel_correlations(inputs[t][layer]) for t in range(new_task + 1)]
    weight, bias = z.weights[layer].detach(), z.biases[layer].detach()
    ws, bs = [], []
    for i, j in pairs:
        h_left = torch.stack([corr[t][i] for t in range(new_task) if sets[i] >> t & 1]).mean(0)
        terms = zip_terms(h_left, corr[new_task][j], damping)
        va = weight_vectors(weight[i : i + 1], bias[i : i + 1], True)
        vb = weight_vectors(weight[j : j + 1], bias[j : j + 1], True)
        w, b = vectors_to_weights(merged_vectors(va, vb, terms.step), tuple(weight.shape[2:]), True)  # type: ignore[arg-type]
        ws.append(w.to(weight.dtype))
        bs.append(b.to(bias.dtype))
    return torch.cat(ws), torch.cat(bs)


def plan_unit(z: ZippedNet, unit: Sequence[int], new_task: int, calib: torch.Tensor, damping: float) -> UnitPlan:
    """Costs of every (zipped-so-far neuron, new network's neuron) pair in ``unit``, greedy pairs,
    merged weights of every member."""
    sets = z.sets[unit[0]]
    new_bit, old_mask = 1 << new_task, (1 << new_task) - 1
    left = [n for n, s in enumerate(sets) if not s & ~old_mask]  # the network zipped so far
    right = [n for n, s in enumerate(sets) if s == new_bit]
    # Every member's input per task, from one forward pass per task.
    inputs = [z.layer_inputs(calib, t, [l for l in unit if z.kinds[l] != "add"]) for t in range(new_task + 1)]
    dense = {l: _dense_terms(z, l, left, right, new_task, inputs, damping) for l in unit if z.kinds[l] in DENSE}
    costs = sum((d.costs for d in list(dense.values())[1:]), start=next(iter(dense.values())).costs)
    local = greedy_pairs(costs)
    pairs = [(left[i], right[j]) for i, j in local]
    if not pairs:
        empty = {l: (torch.zeros(0, *z.weights[l].shape[1:]), torch.zeros(0)) for l in unit if z.kinds[l] != "add"}
        return UnitPlan([], [], empty)
    merged = {l: _dense_merged(z, l, d, pairs) for l, d in dense.items()}
    for l in unit:
        if z.kinds[l] == "dw":
            merged[l] = _depthwise_merged(z, l, pairs, new_task, inputs, damping)
    return UnitPlan(pairs, [float(costs[i, j]) for i, j in local], merged)
