"""``pam bench-scale``: what data parallelism and streaming buy on this machine.

Two measurements, written to ``results/scale.json`` and ``results/scale.md`` with the machine's
load average (the machine is shared; the figures move with it):

* **epoch time** of fine-tuning a multitask network (the hard-shared trunk of every task, as the
  pruner fine-tunes) on the largest generated data set (``composite``) at 1 process and at 2
  processes under torchrun (gloo), same global batch; scaling efficiency = t1 / (2 x t2);
* **peak RSS** of one loader pass over every split of a generated folder of 20,000 images, eager
  (all decoded into memory) vs streaming (workers + bounded cache), each in a fresh process; the
  figure is the growth over the process's RSS before loading, workers' unique memory included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from merging.checkpoint import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class ScaleBenchConfig:
    out_dir: Path = Path("results")  # writes scale.json and scale.md here
    dataset: str = "composite"  # the largest generated data set
    epochs: int = 4  # timed fine-tuning epochs per run (the first is reported apart: warm-up)
    batch_size: int = 64  # global batch, as the pruner's fine-tunes
    # (processes, threads per process) to time: one process using both cores, one single-threaded
    # process (the per-rank work of the 2-process run), and two single-threaded ranks
    runs: tuple[tuple[int, int], ...] = ((1, 2), (1, 1), (2, 1))
    images: int = 20_000  # images in the generated folder for the loader pass
    image_size: int = 64  # generated and loaded at this size, RGB (eager: 48 KB of float32 per image)
    folder: Path = Path("runs/scale-folder")  # where the generated folder goes (reused when complete)
    workers: int = 2  # streaming: DataLoader workers
    cache_mb: float = 32.0  # streaming: cache per process


# ---------------------------------------------------------------------------- generated folder
def write_image_folder(root: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """``n`` RGB PNGs (blocky random patterns) and a ``labels.csv`` with two tasks; kept if complete."""
    from PIL import Image
    from tqdm.auto import tqdm

    root.mkdir(parents=True, exist_ok=True)
    csv = root / "labels.csv"
    if csv.is_file() and sum(1 for _ in csv.open()) == n + 1:
        return root
    rng = np.random.default_rng(seed)
    rows = ["image,shape,color"]
    block = max(1, size // 8)
    for i in tqdm(range(n), desc="writing images", leave=False, disable=None):
        arr = rng.integers(0, 256, (size // block, size // block, 3), dtype=np.uint8)
        Image.fromarray(arr.repeat(block, 0).repeat(block, 1)).save(root / f"{i:06d}.png", compress_level=1)
        rows.append(f"{i:06d}.png,{['round', 'square'][i % 2]},{['red', 'green', 'blue'][i % 3]}")
    atomic_write_bytes(csv, ("\n".join(rows) + "\n").encode())
    return root


class PeakRss:
    """Peak RSS of this process plus the unique memory of its children (DataLoader workers), sampled."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.now()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = int(self.proc.memory_info().rss)
        for child in self.proc.children(recursive=True):
            try:
                total += int(child.memory_full_info().uss)
            except Exception:  # a worker that just exited
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def loader_pass(root: Path, size: int, stream: bool, workers: int, cache_mb: float) -> dict[str, Any]:
    """Load the folder and read every batch of every split once; RSS growth in MB (this process)."""
    import PIL.Image
    import sklearn.model_selection  # noqa: F401  (imported before the baseline: library code is not data)
    import torch

    from merging.data import load_dataset
    from merging.data.stream import LoaderConfig

    torch.set_num_threads(1)
    PIL.Image.init()
    with PeakRss() as rss:
        t0 = time.perf_counter()
        splits = load_dataset(
            "folder",
            root=root,
            size=(size, size),
            channels=3,
            stream=stream,
            loader=LoaderConfig(workers=workers, cache_mb=cache_mb),
        )
        images = 0
        for part in (splits.train, splits.val, splits.test):
            for xb, _ in part.batches(256, shuffle=True, generator=torch.Generator().manual_seed(0)):
                images += len(xb)
        seconds = time.perf_counter() - t0
    return {
        "stream": stream,
        "workers": workers if stream else 0,
        "cache_mb": cache_mb if stream else None,
        "images": images,
        "seconds": round(seconds, 2),
        "rss_growth_mb": round((rss.peak - rss.base) / 2**20, 1),
        "rss_base_mb": round(rss.base / 2**20, 1),
    }


def loader_pass_in_child(root: Path, size: int, stream: bool, workers: int, cache_mb: float) -> dict[str, Any]:
    """:func:`loader_pass` in a fresh interpreter (so one measurement's heap never hides another's)."""
    cmd = [
        sys.executable,
        "-m",
        "pam_app.bench.scale",
        "loader-pass",
        str(root),
        str(size),
        "1" if stream else "0",
        str(workers),
        str(cache_mb),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loader pass failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------- epoch time
def epoch_times(dataset: str, epochs: int, batch_size: int) -> dict[str, Any]:
    """Fine-tune the all-task shared trunk for ``epochs`` single-epoch runs of ``fit``; seconds each
    (every rank runs this under torchrun; rank 0's figures are reported)."""
    import torch

    from merging import distributed
    from merging.arch import create_arch
    from merging.data import load_dataset
    from merging.network import MultitaskNet
    from merging.train import TrainConfig, evaluate, fit

    distributed.init(torch.device("cpu"))
    splits = load_dataset(dataset)
    pre = splits.preprocessing
    arch = create_arch("lenet", in_channels=pre.channels, input_size=tuple(pre.size))
    torch.manual_seed(0)
    full = (1 << len(splits.tasks)) - 1
    net = MultitaskNet(list(splits.tasks), arch, [{full: s.width} for s in arch.layers])
    times = []
    for e in range(epochs):
        distributed.barrier()
        t0 = time.perf_counter()
        fit(net, splits.train, TrainConfig(epochs=1, batch_size=batch_size, lr=1e-3, seed=e, progress=False))
        times.append(time.perf_counter() - t0)
    acc = evaluate(net, splits.val)
    return {
        "world": distributed.world_size(),
        "threads": torch.get_num_threads(),
        "train_images": len(splits.train),
        "epoch_seconds": [round(t, 3) for t in times],
        "val_accuracy": acc,
    }


def time_epochs(nproc: int, threads: int, cfg: ScaleBenchConfig) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    args = ["-m", "pam_app.bench.scale", "epochs", cfg.dataset, str(cfg.epochs), str(cfg.batch_size)]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "--max-restarts=0",
            *args,
        ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"epoch timing at {nproc} process(es) failed: {done.stderr[-2000:]}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return dict(json.loads(lines[0]))


# ---------------------------------------------------------------------------- the report
def run_scale_bench(cfg: ScaleBenchConfig) -> dict[str, Any]:
    load_before = os.getloadavg()
    report: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "cpu_count": os.cpu_count(),
        "load_before": [round(v, 2) for v in load_before],
    }
    runs: dict[str, dict[str, Any]] = {}
    for n, threads in cfg.runs:
        print(f"timing fine-tuning epochs at {n} process(es) x {threads} thread(s) ...", flush=True)
        r = time_epochs(n, threads, cfg)
        r["load_after"] = [round(v, 2) for v in os.getloadavg()]
        runs[f"{n}x{threads}"] = r
    report["epochs"] = runs

    def steady(r: dict[str, Any]) -> float:
        t = r["epoch_seconds"][1:] or r["epoch_seconds"]  # the first epoch pays warm-up
        return float(np.median(t))

    # Efficiency of n ranks against one process: t(1) / (n x t(n)), for each one-process baseline.
    singles = {k: steady(r) for k, r in runs.items() if r["world"] == 1}
    report["scaling"] = {
        k: {
            "epoch_seconds": round(steady(r), 3),
            **{f"speedup_vs_{b}": round(t1 / steady(r), 3) for b, t1 in singles.items()},
            **{f"efficiency_vs_{b}": round(t1 / (r["world"] * steady(r)), 3) for b, t1 in singles.items()},
        }
        for k, r in runs.items()
    }
    print(f"writing {cfg.images} images under {cfg.folder} (once) ...", flush=True)
    write_image_folder(cfg.folder, cfg.images, cfg.image_size)
    passes = []
    for stream, workers in ((False, 0), (True, 0), (True, cfg.workers)):
        print(f"loader pass, {'streaming' if stream else 'eager'}, {workers} workers ...", flush=True)
        p = loader_pass_in_child(cfg.folder, cfg.image_size, stream, workers, cfg.cache_mb)
        p["load_after"] = [round(v, 2) for v in os.getloadavg()]
        passes.append(p)
    report["loader"] = passes
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out_dir / "scale.json", report)
    atomic_write_bytes(cfg.out_dir / "scale.md", markdown(report).encode())
    print(markdown(report))
    return report


def markdown(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        "# Scale: data parallelism and streaming data (measured here)",
        "",
        f"Machine: {r['cpu_count']} CPU cores, shared with other jobs; load average (1, 5, 15 min) "
        f"{r['load_before']} before, {r['load_after']} after.",
        "",
        f"## Fine-tuning epoch time, `{c['dataset']}`, global batch {c['batch_size']}, gloo",
        "",
        "| processes x threads | epoch seconds (each run) | steady epoch s | load after |",
        "|---|---|---|---|",
    ]
    for k, e in r["epochs"].items():
        lines.append(
            f"| {k} | {', '.join(f'{t:.2f}' for t in e['epoch_seconds'])} | "
            f"{r['scaling'][k]['epoch_seconds']:.2f} | {e['load_after']} |"
        )
    lines += ["", "| ranks vs one process | speed-up | efficiency t(1) / (n x t(n)) |", "|---|---|---|"]
    for k, sc in r["scaling"].items():
        for key in sc:
            if key.startswith("speedup_vs_") and not k.startswith("1x"):
                base = key.removeprefix("speedup_vs_")
                lines.append(f"| {k} vs {base} | {sc[key]:.2f}x | {100 * sc['efficiency_vs_' + base]:.0f}% |")
    lines += [
        "",
        "Steady epoch time: median of the epochs after the first. Efficiency = t(1) / (n x t(n)).",
        "",
        f"## One loader pass over {c['images']:,} images ({c['image_size']}x{c['image_size']} RGB), every split",
        "",
        "| path | workers | cache MB (in all) | images read | seconds | peak RSS growth MB | load after |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in r["loader"]:
        lines.append(
            f"| {'streaming' if p['stream'] else 'eager'} | {p['workers']} | {p['cache_mb'] or '-'} | "
            f"{p['images']:,} | {p['seconds']:.1f} | {p['rss_growth_mb']:.0f} | {p['load_after']} |"
        )
    lines += [
        "",
        "RSS growth: peak over the loading process's RSS before loading (libraries already imported), "
        "plus its workers' unique memory (USS), sampled every 20 ms; each pass in a fresh process.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "loader-pass":
        root, size, stream, workers, cache_mb = argv[1:6]
        print(json.dumps(loader_pass(Path(root), int(size), stream == "1", int(workers), float(cache_mb))))
        return
    if argv and argv[0] == "epochs":
        from merging import distributed

        res = epoch_times(argv[1], int(argv[2]), int(argv[3]))
        if distributed.is_main():
            print(json.dumps(res), flush=True)
        distributed.barrier()
        distributed.shutdown()
        return
    p = argparse.ArgumentParser(prog="python -m pam_app.bench.scale")
    p.add_argument("--out", default="results")
    p.add_argument("--epochs", type=int, default=ScaleBenchConfig.epochs)
    p.add_argument("--images", type=int, default=ScaleBenchConfig.images)
    a = p.parse_args(argv)
    run_scale_bench(ScaleBenchConfig(out_dir=Path(a.out), epochs=a.epochs, images=a.images))


if __name__ == "__main__":
    main()
