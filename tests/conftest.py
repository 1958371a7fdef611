"""Shared fixtures: small random multitask networks and one real digits zoo per session."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from merging.arch import create_arch
from merging.network import MultitaskNet
from merging.tasks import TaskSpec


def make_tasks(n: int) -> list[TaskSpec]:
    kinds = ["classes", "attributes"]
    return [
        TaskSpec(f"t{i}", kinds[i % 2], tuple(f"l{j}" for j in range(2 + i % 3))) for i in range(n)  # type: ignore[arg-type]
    ]


def random_layout(n_tasks: int, n_layers: int, seed: int, max_width: int = 6) -> list[dict[int, int]]:
    """A layout with many groups per layer, always closed enough to be wired (full set present)."""
    rng = random.Random(seed)
    full = (1 << n_tasks) - 1
    masks = list(range(1, full + 1))
    layout = []
    for _ in range(n_layers):
        chosen = set(rng.sample(masks, k=min(len(masks), rng.randint(2, 6)))) | {full}
        layout.append({m: rng.randint(1, max_width) for m in sorted(chosen)})
    return layout


def random_net(family: str, n_tasks: int, seed: int = 0) -> MultitaskNet:
    torch.manual_seed(seed)
    arch = create_arch("lenet") if family == "lenet" else create_arch("vgg", stages=((8,), (8, 8)), fc_widths=(16,))
    return MultitaskNet(make_tasks(n_tasks), arch, random_layout(n_tasks, len(arch.layers), seed)).eval()


def subsets(names: list[str]) -> list[tuple[str, ...]]:
    return [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]


@pytest.fixture(scope="session")
def digits_splits():
    from merging.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_zoo(tmp_path_factory: pytest.TempPathFactory, digits_splits) -> tuple[Path, dict[str, float]]:
    """The real zoo with default settings (what `pam train` does), trained once per session."""
    import time

    from merging.train import TrainConfig
    from merging.zoo import load_zoo, train_zoo

    out = tmp_path_factory.mktemp("zoo")
    arch = create_arch("lenet")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    train_zoo(digits_splits, arch, TrainConfig(progress=False), out, verbose=False)
    times["total"] = time.perf_counter() - t0
    load_zoo(out)
    return out, times


def assert_bundle_matches_eager(rt, net: MultitaskNet, x: torch.Tensor, methods: set[str]) -> None:
    """The bundle holds exactly ``methods``, and each one's outputs through the ExecuTorch runtime
    ``rt`` match the eager combination module within 1e-4."""
    assert {m.name for m in rt.manifest.methods} == methods
    with torch.no_grad():
        for m in rt.manifest.methods:
            got = rt.run(m.name, x)
            want = net.for_combination(m.name.split("+"))(x)
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(torch.as_tensor(g), w, rtol=1e-4, atol=1e-4)
