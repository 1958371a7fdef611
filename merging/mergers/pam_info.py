"""How much a ranked prefix of channels knows about a task: the information estimates PAM's channel
selection searches over (cached; sizes 1, 2, 4, ... then bisection)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from merging.mi import mutual_information_many


def size_grid(n: int) -> list[int]:
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k *= 2
    return [*sizes, n]


class PrefixInfo:
    """Joint information of prefixes of channel rankings about one task's labels (cached)."""

    def __init__(self, feats: Tensor, labels: Tensor, noise: float) -> None:
        self.feats, self.labels, self.noise = feats, labels, noise
        self.cache: dict[tuple[int, ...], float] = {}

    def info(self, chans: Sequence[int]) -> float:
        key = tuple(chans)
        if key not in self.cache:
            self.cache[key] = mutual_information_many(self.feats[:, list(key)], [self.labels], self.noise)[0]
        return self.cache[key]

    def best(self, order: Sequence[int]) -> float:
        """Best information over prefixes of sizes 1, 2, 4, ..., all (the kernel estimate of a huge
        set is diluted by uninformative channels, so the whole set is not always the best)."""
        return max(self.info(order[:k]) for k in size_grid(len(order)))

    def smallest_prefix(self, order: Sequence[int], target: float) -> list[int] | None:
        """Shortest prefix reaching ``target`` (grid, then bisection: information is near-monotone)."""
        sizes = size_grid(len(order))
        hi = next((k for k in sizes if self.info(order[:k]) >= target), None)
        if hi is None:
            return None
        lo = max([k for k in sizes if k < hi], default=0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.info(order[:mid]) >= target:
                hi = mid
            else:
                lo = mid
        return list(order[:hi])
