"""Mutual information between a set of channels' activations and a task's labels.

Estimator: the Kolchinsky-Tracey pairwise-distance bound on the entropy of a Gaussian mixture,
the one PAM's authors used. The calibration activations are z-scored per dimension and each
sample is taken as the centre of an isotropic Gaussian of variance ``noise * d`` (``d``: number
of non-constant dimensions); the entropy of that mixture is bounded above by

    H(T) <= -1/n sum_i log( 1/n sum_j exp(-||x_i - x_j||^2 / (2 var)) )   (+ a constant in d)

and ``I(T; Y) = H(T) - sum_c p(c) H(T | Y = c)``, each term from the same pairwise distances
(the constant cancels). Why this one: it is the authors' choice (results comparable in kind),
it needs no training (unlike MINE-style neural estimators), it works for any set size from one
channel to a whole layer at O(n^2 d) cost, it is training-free and deterministic, and it is
invariant to the order of the samples. Scaling the kernel variance with ``d`` keeps distances
between typical samples comparable for sets of different sizes, so the estimate of a large set
does not collapse to ``H(Y)`` merely because every sample becomes isolated in high dimension.

Labels: ``(n,)`` integer class ids, or ``(n, k)`` 0/1 attributes; for attributes the estimate is
the sum over attributes of the information about each one (the joint label vector would split
the calibration batch into up to ``2^k`` tiny classes, where the kernel estimate is poor).
Values are in nats.

Leave-one-out (default): the bound as written counts each sample's own kernel (= 1) in both
sums; within a small class that self term dominates and independent 4-dimensional noise then
"carries" 0.6 of the 2.3 nats of a 10-class label. Dropping the diagonal (the usual
leave-one-out kernel entropy estimate) removes that bias: independent features score ~0, a copy
of the labels ~H(Y). ``leave_one_out=False`` gives the plain bound.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from merging.errors import MergingError

# Kernel variance per z-scored dimension: 0.5 blurred 10-class structure, 0.03 isolated every sample.
DEFAULT_NOISE = 0.1


def standardize(x: Tensor) -> Tensor:
    """(n, d) -> z-scored per column; constant columns (dead ReLUs) become 0 and carry nothing."""
    x = x.reshape(len(x), -1).double()
    std = x.std(0, unbiased=False)
    live = std > 1e-8 * (1.0 + x.abs().amax(0))
    out = torch.zeros_like(x)
    out[:, live] = (x[:, live] - x[:, live].mean(0)) / std[live]
    return out


def _sq_distances(z: Tensor) -> Tensor:
    sq = (z * z).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min_(0.0)


def _label_columns(labels: Tensor, n: int) -> list[Tensor]:
    if len(labels) != n:
        raise MergingError("bad_data", f"{len(labels)} labels for {n} samples")
    if labels.dim() == 1:
        return [labels.long()]
    if labels.dim() == 2:
        return [labels[:, a].long() for a in range(labels.shape[1])]
    raise MergingError("bad_data", f"labels must be (n,) classes or (n, k) attributes, got shape {tuple(labels.shape)}")


def _kernel(features: Tensor, noise: float) -> Tensor | None:
    """exp(-d^2 / 2 var) between every pair of samples (None if no dimension varies)."""
    z = standardize(features)
    d = int((z.abs().sum(0) > 0).sum())
    if d == 0:
        return None
    z = z.float()  # float32 is ample for kernel sums and ~3x faster
    return torch.exp(-_sq_distances(z) / (2.0 * noise * d))


def _mi_from_kernel(k: Tensor, y: Tensor, leave_one_out: bool) -> float:
    # H(T) - H(T|Y): for sample i, the mixture density over all samples versus over its own class.
    n = len(y)
    _, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    onehot = torch.nn.functional.one_hot(inv, len(counts)).to(k.dtype)
    own = (k @ onehot).gather(1, inv[:, None]).squeeze(1)
    total = k.sum(1)
    n_own = counts[inv].to(k.dtype)
    if leave_one_out:
        # Drop each sample's own kernel (the diagonal, 1): with it, a sample isolated in its class
        # looks "explained" by itself and small classes inflate the estimate (bias ~ log n / n_c).
        total, own, n_all, n_own = total - 1.0, own - 1.0, float(n - 1), (n_own - 1.0).clamp_min(1.0)
    else:
        n_all = float(n)
    tiny = torch.finfo(k.dtype).tiny
    h = -(total.clamp_min(tiny) / n_all).log().mean()
    h_cond = -(own.clamp_min(tiny) / n_own).log().mean()
    return max(0.0, float(h - h_cond))


def mutual_information_many(
    features: Tensor, labels: Sequence[Tensor], noise: float = DEFAULT_NOISE, leave_one_out: bool = True
) -> list[float]:
    """``I(features; labels[k])`` for every label tensor, sharing one distance matrix.

    ``features``: (n, ...) activations of one set of channels on n calibration samples.
    """
    n = len(features)
    if n < 2:
        raise MergingError("bad_data", "the MI estimate needs at least 2 samples")
    if noise <= 0:
        raise MergingError("bad_argument", f"kernel noise must be positive, got {noise}")
    k = _kernel(features, noise)
    if k is None:  # every dimension constant: no information
        return [0.0 for _ in labels]
    return [sum(_mi_from_kernel(k, col, leave_one_out) for col in _label_columns(lab, n)) for lab in labels]


def mutual_information(
    features: Tensor, labels: Tensor, noise: float = DEFAULT_NOISE, leave_one_out: bool = True
) -> float:
    """``I(features; labels)`` in nats (see the module docstring for the estimator)."""
    return mutual_information_many(features, [labels], noise, leave_one_out)[0]


def label_entropy(labels: Tensor) -> float:
    """Plug-in entropy of the labels in nats (summed over attributes): the ceiling of the MI."""
    total = 0.0
    for col in _label_columns(labels, len(labels)):
        p = torch.unique(col, return_counts=True)[1].double() / len(col)
        total += float(-(p * p.log()).sum())
    return total
