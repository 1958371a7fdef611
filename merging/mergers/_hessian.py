"""MTZ's layer-wise second-order terms: input correlations, pair costs, merged weights, greedy pairs.

A neuron's pre-activation is ``w . [x; 1]`` (its bias is the weight of a constant input). MTZ
approximates the error of replacing ``w`` by ``w + delta`` with ``1/2 delta^T H delta``, where
``H = E[[x; 1][x; 1]^T]`` is the correlation of that layer's inputs. Forcing neuron ``i`` of net A
and neuron ``j`` of net B onto one weight vector costs, at the best merged vector,

    cost = 1/2 d^T (H_A^-1 + H_B^-1)^-1 d,   d = w_i - w_j,
    merged = w_i + H_A^-1 (H_A^-1 + H_B^-1)^-1 (w_j - w_i).

Convolutions are split per kernel position: the pre-activation is ``sum_p (w_p . x_p + b / P)``
over the ``P`` kernel positions, and one correlation of the per-position input-channel vector
(with the bias coordinate), averaged over every position of the map, serves every ``p``; costs
are summed over positions, and the merged bias is the sum of its per-position shares. Dense
layers (a kernel covering the whole map) use the full flattened input instead: their positions
are not exchangeable.

All of this runs in float64: the inverses of nearly singular correlations (dead ReLUs) are
where float32 loses the cost ordering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def input_correlation(x: Tensor, per_position: bool) -> Tensor:
    """``E[[x; 1][x; 1]^T]`` of a layer input ``x`` (B, C, H, W).

    ``per_position``: ``x`` is the channel vector at each pixel (a (C+1)-square matrix, averaged
    over batch and pixels); otherwise the whole flattened map (a (C*H*W+1)-square matrix).
    """
    x = x.detach().to(torch.float64)
    b, c, h, w = x.shape  # explicit sizes: c may be 0 (nothing zipped below yet)
    flat = x.permute(0, 2, 3, 1).reshape(b * h * w, c) if per_position else x.reshape(b, c * h * w)
    aug = torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype)], 1)
    return aug.T @ aug / aug.shape[0]


def weight_vectors(weight: Tensor, bias: Tensor, per_position: bool) -> Tensor:
    """Neurons' weights (N, C, kh, kw) and biases (N,) as vectors (N, P, D+1) in ``H``'s coordinates.

    ``per_position``: one C-vector per kernel position plus ``bias / P``; otherwise one flattened
    vector (P = 1) plus the bias.
    """
    n, c, kh, kw = weight.shape
    w = weight.detach().to(torch.float64)
    b = bias.detach().to(torch.float64)
    if per_position:
        p = kh * kw
        vec = w.reshape(n, c, p).transpose(1, 2)  # (N, P, C)
        share = (b / p).view(n, 1, 1).expand(n, p, 1)
        return torch.cat([vec, share], 2)
    return torch.cat([w.reshape(n, 1, c * kh * kw), b.view(n, 1, 1)], 2)


def vectors_to_weights(vec: Tensor, kernel: tuple[int, int], per_position: bool) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`weight_vectors`: (N, P, D+1) -> weight (N, C, kh, kw), bias (N,)."""
    n = vec.shape[0]
    kh, kw = kernel
    if per_position:
        c = vec.shape[2] - 1
        weight = vec[:, :, :c].transpose(1, 2).reshape(n, c, kh, kw)
        return weight, vec[:, :, c].sum(1)
    c = (vec.shape[2] - 1) // (kh * kw)
    return vec[:, 0, :-1].reshape(n, c, kh, kw), vec[:, 0, -1]


def damped_inverse(h: Tensor, damping: float) -> Tensor:
    """``(H + lambda I)^-1`` with ``lambda = damping x mean(diag H)`` (relative, so scale-free).

    Correlations of ReLU outputs are often singular (a channel that never fires has a zero row);
    the damping makes them invertible and says errors along such directions are nearly free.
    """
    lam = damping * float(h.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    chol = torch.linalg.cholesky(h + lam * eye)
    return torch.cholesky_inverse(chol)


@dataclass(frozen=True)
class ZipTerms:
    """The two matrices one (H_A, H_B) pair needs."""

    h_hat: Tensor  # (H_A^-1 + H_B^-1)^-1: the metric of the pair cost
    step: Tensor  # H_A^-1 h_hat: merged = w_a + step (w_b - w_a)


def zip_terms(h_a: Tensor, h_b: Tensor, damping: float) -> ZipTerms:
    inv_a = damped_inverse(h_a, damping)
    inv_b = damped_inverse(h_b, damping)
    s = inv_a + inv_b
    h_hat = torch.linalg.inv(0.5 * (s + s.T))
    h_hat = 0.5 * (h_hat + h_hat.T)
    return ZipTerms(h_hat, inv_a @ h_hat)


def pair_costs(va: Tensor, vb: Tensor, h_hat: Tensor) -> Tensor:
    """Cost of every pair: (Na, P, D) x (Nb, P, D) -> (Na, Nb), summed over positions."""
    qa = torch.einsum("ipd,de,ipe->i", va, h_hat, va)
    qb = torch.einsum("jpd,de,jpe->j", vb, h_hat, vb)
    cross = torch.einsum("ipd,de,jpe->ij", va, h_hat, vb)
    return (0.5 * (qa[:, None] + qb[None, :] - 2.0 * cross)).clamp_min(0.0)


def merged_vectors(va: Tensor, vb: Tensor, step: Tensor) -> Tensor:
    """Merged vectors of matched rows: ``va + step (vb - va)`` per position, (K, P, D)."""
    return va + (vb - va) @ step.T


def greedy_pairs(costs: Tensor) -> list[tuple[int, int]]:
    """Disjoint pairs in increasing cost (ties broken by index, so deterministic), until one side runs out."""
    na, nb = costs.shape
    order = torch.argsort(costs.flatten(), stable=True).tolist()
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for flat in order:
        i, j = divmod(flat, nb)
        if i in used_a or j in used_b:
            continue
        pairs.append((i, j))
        used_a.add(i)
        used_b.add(j)
        if len(pairs) == min(na, nb):
            break
    return pairs
