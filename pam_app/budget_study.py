"""``pam budget-study``: the budget rule's error rates, measured against a truth split.

On the generated ``glyphs`` set (every image an independent draw): train the single-task zoo, run
real pruning routes and keep every network the pruner judges (``prune(on_visit=...)``). Each
visited network is then scored on a *truth* split (50,000 images by default, larger than any check
set) for its true drop per task, and on a separate *pool* of independent images from which check
sets of 360 to 10,000 images are drawn (with replacement: the pool stands in for the population).
For every check-set size and confidence, the rule "accept iff drop + z * SE <= budget" is applied
to many drawn check sets:

- false accept: accepted while the true drop exceeds the budget;
- false reject: rejected while the true drop is at most budget - 0.25.

Rates are over the (network, task) pairs of that truth class, averaged over the draws.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merging.arch import create_arch
from merging.checkpoint import atomic_write_json
from merging.data.glyphs import glyphs, make_split
from merging.mergers import create_merger
from merging.network import MultitaskNet
from merging.pruning import PruneConfig, check_set, missed_at_start, prune, reference_accuracy
from merging.pruning.budget import z_value
from merging.report import format_table
from merging.train import TrainConfig, correctness, train_single_task


@dataclass(frozen=True)
class StudyConfig:
    seed: int = 0  # data stream, zoo and pruning seed
    size: int = 16  # glyph image side (pixels)
    zoo_epochs: int = 15  # training epochs of each single-task network
    pool: int = 40_000  # independent images check sets are drawn from
    truth: int = 50_000  # independent images that give each network's true drop
    check_sizes: tuple[int, ...] = (360, 1000, 3000, 5000, 10_000)
    confidences: tuple[float, ...] = (0.5, 0.9, 0.95)  # 0.5: the bare point estimate
    draws: int = 300  # check sets drawn per (network, task, size)
    budget: float = 1.0  # points
    good_margin: float = 0.25  # a rejection is false when the true drop is at most budget - this
    routes: tuple[str, ...] = ("separate", "pam")  # pruning runs whose visited networks are studied
    prune: PruneConfig = field(default_factory=lambda: PruneConfig(
        step=0.15, min_step=0.04, max_steps=16, finetune_epochs=3, retry_epochs=3, final_epochs=6,
        taylor_batches=4, epoch_samples=1078, progress=False))  # the benchmark's schedule when studied (3+3)
    out_dir: Path = Path("results")


@dataclass
class Visit:
    route: str
    kind: str
    task: str
    true_drop: float  # points, on the truth split
    diff: torch.Tensor  # (pool,) int8: reference correct minus network correct, per pool image


def _score(net: MultitaskNet, ref_pool: dict[str, torch.Tensor], ref_truth: dict[str, torch.Tensor],
           pool: Any, truth: Any, route: str, kind: str) -> list[Visit]:
    cp = correctness(net, pool.select_tasks(net.task_names))
    ct = correctness(net, truth.select_tasks(net.task_names))
    return [Visit(route, kind, t, 100.0 * float(ref_truth[t].mean() - ct[t].mean()),
                  (ref_pool[t] - cp[t]).to(torch.int8)) for t in net.task_names]


def simulate(visits: Sequence[Visit], cfg: StudyConfig) -> list[dict[str, Any]]:
    """Accept rates of the paired test on drawn check sets, per size and confidence."""
    gen = torch.Generator().manual_seed(cfg.seed)
    bad = [v for v in visits if v.true_drop > cfg.budget]
    good = [v for v in visits if v.true_drop <= cfg.budget - cfg.good_margin]
    rows = []
    for n in cfg.check_sizes:
        accept: dict[float, dict[str, float]] = {c: {"bad": 0.0, "good": 0.0} for c in cfg.confidences}
        for cls, members in (("bad", bad), ("good", good)):
            for v in members:
                idx = torch.randint(0, len(v.diff), (cfg.draws, n), generator=gen)
                d = v.diff[idx].float()
                mean, se = d.mean(1), d.std(1) / n ** 0.5
                for c in cfg.confidences:
                    upper = 100.0 * (mean + z_value(c) * se)
                    accept[c][cls] += float((upper <= cfg.budget + 1e-9).float().mean())
        for c in cfg.confidences:
            rows.append({"check_images": n, "confidence": c,
                         "false_accept": accept[c]["bad"] / max(1, len(bad)),
                         "false_reject": 1.0 - accept[c]["good"] / max(1, len(good)),
                         "truly_over": len(bad), "truly_within": len(good)})
    return rows


def run_study(cfg: StudyConfig, log: Any = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    log = log or (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    splits = glyphs(cfg.size, seed=cfg.seed)
    stream = splits.info["stream"]
    pool, truth = make_split(cfg.pool, cfg.size, stream, 4), make_split(cfg.truth, cfg.size, stream, 3)
    arch = create_arch("lenet", input_size=(cfg.size, cfg.size))
    nets = [train_single_task(t, arch, splits.train, TrainConfig(epochs=cfg.zoo_epochs, seed=cfg.seed, progress=False))
            for t in splits.tasks]
    log(f"zoo trained ({time.perf_counter() - t0:.0f}s)")
    ref_pool: dict[str, torch.Tensor] = {}
    ref_truth: dict[str, torch.Tensor] = {}
    for net in nets:
        ref_pool.update(correctness(net, pool.select_tasks(net.task_names)))
        ref_truth.update(correctness(net, truth.select_tasks(net.task_names)))
    pcfg = replace(cfg.prune, seed=cfg.seed)
    ref = reference_accuracy(nets, check_set(splits.val, pcfg.check_shifts, pcfg.seed, pcfg.shift_below))
    visits: list[Visit] = []
    shipped: list[Visit] = []
    for route in cfg.routes:
        seen: list[tuple[str, MultitaskNet]] = []

        def keep(kind: str, net: MultitaskNet, seen: list[tuple[str, MultitaskNet]] = seen) -> None:
            seen.append((kind, copy.deepcopy(net)))

        starts = ([copy.deepcopy(n) for n in nets] if route == "separate"
                  else [create_merger(route).merge(nets, splits.train, seed=cfg.seed)])
        for start in starts:
            result, history = prune(start, splits, pcfg, reference=ref, on_visit=keep)
            if not missed_at_start(history):  # a start that missed the budget ships nothing
                shipped += _score(result, ref_pool, ref_truth, pool, truth, route, "shipped")
        for kind, net in seen:
            visits += _score(net, ref_pool, ref_truth, pool, truth, route, kind)
        log(f"{route}: {len(seen)} networks visited ({time.perf_counter() - t0:.0f}s)")
    rows = simulate(visits, cfg)
    return {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "rows": rows,
            "visits": [{"route": v.route, "kind": v.kind, "task": v.task, "true_drop": v.true_drop,
                        "disagreement": float(v.diff.ne(0).float().mean())} for v in visits],
            "shipped": [{"route": v.route, "task": v.task, "true_drop": v.true_drop} for v in shipped],
            "seconds": time.perf_counter() - t0}


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "budget-rule.json", result)
    cfg = result["config"]
    rows = [[f"{r['check_images']:,}", "point estimate" if r["confidence"] == 0.5 else f"{r['confidence']:.0%}",
             f"{100 * r['false_accept']:.1f}%", f"{100 * r['false_reject']:.1f}%"] for r in result["rows"]]
    first = result["rows"][0]
    shipped = result["shipped"]
    over = sum(1 for s in shipped if s["true_drop"] > cfg["budget"])
    dis = sorted(v["disagreement"] for v in result["visits"])
    lines = [
        "# The budget rule's error rates (`pam budget-study`)", "",
        f"glyphs at {cfg['size']}x{cfg['size']}, seed {cfg['seed']}; networks visited by the pruning runs "
        f"{', '.join(cfg['routes'])}: {len(result['visits'])} (network, task) pairs, of which "
        f"{first['truly_over']} truly lose more than {cfg['budget']} point and {first['truly_within']} truly "
        f"lose at most {cfg['budget'] - cfg['good_margin']:.2f} (truth: {cfg['truth']:,} independent images); "
        f"check sets drawn {cfg['draws']} times each from a pool of {cfg['pool']:,} other images. "
        f"Disagreement with the reference per pair: median {100 * dis[len(dis) // 2]:.1f}%, "
        f"max {100 * dis[-1]:.1f}%.", "",
        "Rule: accept iff point drop + z * SE(paired difference) <= budget.", "",
        format_table(["check images", "confidence", "false accept", "false reject"], rows), "",
        f"Networks the runs shipped: {len(shipped)} (network, task) pairs; true drop over the budget: {over}; "
        f"worst true drop {max((s['true_drop'] for s in shipped), default=0):.2f} points.", "",
        f"Measured in {result['seconds'] / 60:.1f} minutes.",
    ]
    path = out_dir / "budget-rule.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main_study(args: Any) -> int:
    cfg = StudyConfig(seed=args.seed, zoo_epochs=args.epochs, draws=args.draws, out_dir=Path(args.out_dir),
                      routes=tuple(args.routes.split(",")))
    result = run_study(cfg)
    path = write_report(result, cfg.out_dir)
    print(path.read_text())
    print(json.dumps({"written": str(path)}))
    return 0
