"""The budget rule on cases with known truth: its false-accept rate is within its stated bound, the
held-out certification backs off along the trajectory, and the resolution is said as measured."""

from __future__ import annotations

import math

import torch

from merging.data.base import MultitaskData
from merging.pruning.budget import Reference, check_subset, judge, margin, split_checks
from merging.tasks import TaskSpec


def _draw(n: int, flip_rate: float, fix_rate: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and network correctness on n independent images: the network gets wrong a share
    ``flip_rate`` of the images the reference gets right and right a share ``fix_rate`` of the rest."""
    ref = (torch.rand(n, generator=gen) < 0.92).float()
    u = torch.rand(n, generator=gen)
    net = torch.where(ref > 0, (u >= flip_rate).float(), (u < fix_rate).float())
    return ref, net


def test_false_accept_rate_at_the_boundary_is_within_one_minus_confidence() -> None:
    # True drop = 0.92 * 0.05 - 0.08 * 0.05 = 4.2 points... scale flips so the truth sits just over
    # the budget: drop = 0.92 * f - 0.08 * g = 1.05 points with g = 0.1.
    g = 0.1
    f = (0.0105 + 0.08 * g) / 0.92
    gen = torch.Generator().manual_seed(0)
    accepted = 0
    trials = 400
    for _ in range(trials):
        ref, net = _draw(3000, f, g, gen)
        v = judge({"t": net}, Reference({"t": 100 * float(ref.mean())}, {"t": ref}), 1.0, 0.9)
        accepted += v.ok
    # one-sided 90%: at most 10% of truly-over networks accepted (binomial slack: 3 sd of 400 trials)
    assert accepted / trials <= 0.10 + 3 * math.sqrt(0.1 * 0.9 / trials)
    # ... and the point estimate alone accepts far more of them: the margin is doing the work
    point = sum(judge({"t": n}, Reference({"t": 100 * float(r.mean())}, {"t": r}), 1.0, 0.5).ok
                for r, n in (_draw(3000, f, g, gen) for _ in range(200)))
    assert point / 200 > 0.25


def test_margin_matches_the_verdicts_disagreement_and_sample_size() -> None:
    gen = torch.Generator().manual_seed(1)
    ref, net = _draw(10_000, 0.03, 0.2, gen)
    v = judge({"t": net}, Reference({"t": 100 * float(ref.mean())}, {"t": ref}), 1.0, 0.9)
    assert v.images == 10_000
    assert abs(v.disagreement["t"] - float((ref != net).float().mean())) < 1e-9
    # the upper bound is the point drop plus z * SE; SE^2 ~ p / n for small drops
    assert abs((v.upper["t"] - v.drop["t"]) - margin(v.disagreement["t"], 10_000, 0.9)) < 0.02
    # what the issue measured on digits: 359 images at 3% disagreement cannot certify within 1 point
    assert margin(0.03, 359, 0.9) > 1.1


def test_split_keeps_shifted_copies_of_an_image_together() -> None:
    images, copies = 50, 3
    x = torch.arange(images).float().repeat(copies).view(-1, 1, 1, 1)
    data = MultitaskData((TaskSpec("t", "classes", ("a", "b")),), x, {"t": torch.zeros(images * copies).long()},
                         images=images)
    steer, held = split_checks(data, 0.5, seed=0)
    assert not set(steer.tolist()) & set(held.tolist())
    assert len(steer) + len(held) == images * copies
    part = check_subset(data, held)
    assert part.images == len(held) // copies
    ids = part.x.flatten().long().view(copies, -1)
    assert all(torch.equal(ids[0], ids[k]) for k in range(copies))  # copy k of image i at i + k * images


def test_pam_prune_refuses_an_out_of_budget_start_and_writes_nothing(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from merging.arch import create_arch
    from merging.checkpoint import save_model
    from merging.data import load_dataset
    from merging.network import MultitaskNet
    from merging.train import TrainConfig
    from merging.zoo import train_zoo
    from pam_app.cli import main

    splits = load_dataset("digits", tasks=("parity",))
    arch = create_arch("lenet", width_mult=0.5)
    train_zoo(splits, arch, TrainConfig(epochs=6, progress=False), tmp_path / "zoo", verbose=False)
    untrained = MultitaskNet.single_task(splits.tasks[0], arch)  # far below its trained reference
    save_model(untrained, tmp_path / "start")
    out = tmp_path / "pruned"
    code = main(["prune", str(tmp_path / "start.json"), "--zoo", str(tmp_path / "zoo"), "--out", str(out),
                 "--recover-epochs", "0", "--dataset", "digits"])
    err = capsys.readouterr().err
    assert code == 2
    assert "misses the 1-point budget before pruning" in err and "nothing written" in err
    assert not out.with_suffix(".json").exists() and not out.with_suffix(".pt").exists()
