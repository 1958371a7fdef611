"""Data parallelism on CPU (gloo, 2 processes on loopback): pruning agrees across ranks, a dead rank
stops the job, and 2-process training matches 1-process accuracy.

The ranks are started here with the environment torchrun would give them (so one can be killed and
the other watched); the zoo test goes through ``pam train --nproc 2`` (torchrun's own launcher).
Run as ``python -m tests.test_scale_ddp <worker> ...`` a module's worker entry points execute.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_ranks(args: list[str], world: int = 2, timeout_s: float = 20.0) -> list[subprocess.Popen[str]]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PAM_COLLECTIVE_TIMEOUT": str(timeout_s)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.test_scale_ddp", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


# ---------------------------------------------------------------------------- workers (run in the ranks)
def _small_digits():  # type: ignore[no-untyped-def]
    from merging.data import load_dataset

    s = load_dataset("digits", tasks=("digit", "parity"))
    s.train = s.train.subset(list(range(192)))
    s.val = s.val.subset(list(range(96)))
    return s


def worker_prune(out: str) -> None:
    """Train a small shared trunk 2 epochs and prune it 2 steps under DDP; save what each rank ends with."""
    import copy

    from merging import distributed
    from merging.arch import create_arch
    from merging.network import MultitaskNet
    from merging.pruning import PruneConfig, prune
    from merging.train import TrainConfig, fit

    distributed.init(torch.device("cpu"))
    rank = distributed.rank()
    splits = _small_digits()
    arch = create_arch("lenet", in_channels=1, input_size=tuple(splits.preprocessing.size), width_mult=0.5)
    torch.manual_seed(0)
    net = MultitaskNet(list(splits.tasks), arch, [{3: s.width} for s in arch.layers])
    fit(net, splits.train, TrainConfig(epochs=1, progress=False))
    cfg = PruneConfig(budget=100.0, step=0.3, max_steps=1, finetune_epochs=1, retry_epochs=0, final_epochs=1,
                      recover_epochs=0, taylor_batches=2, check_shifts=0, progress=False)
    pruned, history = prune(net, splits, cfg)
    # agree_net must also repair a rank that went its own way (here: rank 1 cuts a channel).
    other = copy.deepcopy(pruned)
    if rank == 1:
        mask = next(iter(other.layout[0]))
        other.select_channels(0, mask, list(range(other.layout[0][mask] - 1)))
    other = distributed.agree_net(other)
    torch.save({"pruned": pruned.state_dict(), "agreed": other.state_dict()}, Path(out) / f"rank{rank}.pt")
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "layout": [{str(m): w for m, w in g.items()} for g in pruned.layout],
        "agreed_layout": [{str(m): w for m, w in g.items()} for g in other.layout],
        "accepted": sum(1 for h in history if h.get("accepted")),
        "world": distributed.world_size()}))
    distributed.barrier()
    distributed.shutdown()


def worker_mtz(out: str) -> None:
    """Two small single-task networks zipped by MTZ with DDP retraining; save each rank's result."""
    from merging import distributed
    from merging.arch import create_arch
    from merging.mergers.mtz import MtzMerger
    from merging.network import MultitaskNet

    distributed.init(torch.device("cpu"))
    splits = _small_digits()
    arch = create_arch("lenet", in_channels=1, input_size=tuple(splits.preprocessing.size), width_mult=0.5)
    nets = []
    for k, task in enumerate(splits.tasks):
        torch.manual_seed(k)
        nets.append(MultitaskNet.single_task(task, arch).eval())
    merger = MtzMerger(retrain_steps=6, fractions=(1.0,) + (0.5,) * (len(arch.layers) - 1), calibration_size=64,
                       progress=False)
    merged = merger.merge(nets, splits.train, seed=0)
    torch.save(merged.state_dict(), Path(out) / f"rank{distributed.rank()}.pt")
    distributed.barrier()
    distributed.shutdown()


def worker_train_forever(out: str) -> None:
    """Run ``pam train`` for far longer than the test waits; say "ready" at the first training step."""
    import merging.train as train
    from pam_app.cli import main

    shift = train.random_shift

    def announcing_shift(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not announcing_shift.done:  # type: ignore[attr-defined]
            announcing_shift.done = True  # type: ignore[attr-defined]
            print("ready", flush=True)
        return shift(*args, **kwargs)

    announcing_shift.done = False  # type: ignore[attr-defined]
    train.random_shift = announcing_shift
    sys.exit(main(["train", "--tasks", "digit", "--epochs", "1000", "--out", out, "--device", "cpu"]))


# ---------------------------------------------------------------------------- tests
def test_ddp_prune_ends_identical_on_both_ranks(tmp_path: Path) -> None:
    results = _finish(_spawn_ranks(["prune", str(tmp_path)]), timeout=240)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert meta[0]["world"] == meta[1]["world"] == 2
    assert meta[0]["accepted"] >= 1  # the structure did change
    assert meta[0]["layout"] == meta[1]["layout"]
    assert meta[0]["agreed_layout"] == meta[1]["agreed_layout"] == meta[0]["layout"]
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("pruned", "agreed"):
        a, b = states[0][key], states[1][key]
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{key}: {k} differs between ranks")


@pytest.mark.slow  # ~20 s of process start-up and a collective timeout
def test_killed_rank_stops_the_other_within_the_timeout(tmp_path: Path) -> None:
    timeout_s = 15.0
    procs = _spawn_ranks(["train-forever", str(tmp_path / "zoo")], timeout_s=timeout_s)
    try:
        for p in procs:  # both are training
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "ready", procs[0].stderr.read() if procs[0].stderr else ""
        time.sleep(1.0)
        assert procs[0].poll() is None and procs[1].poll() is None
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 30)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 3, err[-2000:]  # a rank failure, not a crash (1) or success
    assert waited < timeout_s + 10, f"the surviving rank took {waited:.1f} s to stop"
    assert "rank 0" in err and "collective failed" in err, err[-2000:]


@pytest.mark.slow
def test_hung_rank_times_out(tmp_path: Path) -> None:
    timeout_s = 10.0
    procs = _spawn_ranks(["train-forever", str(tmp_path / "zoo")], timeout_s=timeout_s)
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(2.0)
        procs[1].send_signal(signal.SIGSTOP)  # alive but silent: only the timeout can tell
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    assert procs[0].returncode not in (0, None)
    assert waited < timeout_s + 20, f"the surviving rank took {waited:.1f} s to stop"
    assert "error" in err


@pytest.mark.slow
def test_ddp_mtz_retraining_ends_identical_on_both_ranks(tmp_path: Path) -> None:
    results = _finish(_spawn_ranks(["mtz", str(tmp_path)]), timeout=600)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{k} differs between ranks")


@pytest.mark.slow
def test_two_process_zoo_matches_one_process_accuracy(tmp_path: Path) -> None:
    """``pam train --nproc 2`` (torchrun's launcher) vs one process: same seed, within 1 point."""
    accs = {}
    for n in (1, 2):
        out = tmp_path / f"zoo{n}"
        cmd = [sys.executable, "-m", "pam_app", "train", "--tasks", "digit,parity", "--epochs", "15",
               "--out", str(out), "--device", "cpu", "--nproc", str(n)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        index = json.loads((out / "zoo.json").read_text())
        accs[n] = {t: v["test_accuracy"] for t, v in index["tasks"].items()}
    for t in accs[1]:
        assert abs(accs[2][t] - accs[1][t]) <= 1.0, accs


if __name__ == "__main__":
    {"prune": worker_prune, "mtz": worker_mtz, "train-forever": worker_train_forever}[sys.argv[1]](*sys.argv[2:])
