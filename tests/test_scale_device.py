"""Device choice (``--device``, ``--amp``) and the batch sharding of data parallelism (no processes)."""

from __future__ import annotations

import pytest
import torch

from merging.data.base import batch_count
from merging.device import Precision, current_device, resolve_device, use_device
from merging.errors import MergingError
from pam_app.cli import main

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@needs_no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_coded_error(spec: str) -> None:
    with pytest.raises(MergingError) as e:
        resolve_device(spec)
    assert e.value.code == "device_unavailable" and "CUDA is not available" in e.value.message


@needs_no_cuda
def test_cli_device_cuda_without_cuda_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    for cmd in (["train", "--epochs", "1", "--out", str(tmp_path / "zoo")],
                ["prune", str(tmp_path / "missing.json"), "--out", str(tmp_path / "p")],
                ["merge", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "m")]):
        assert main([*cmd, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "[device_unavailable]" in err and "Traceback" not in err
    assert not (tmp_path / "zoo").exists()  # failed before doing anything


def test_device_specs() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    for bad in ("gpu", "cpu:1", "cuda:x", "mps:0"):
        with pytest.raises(MergingError) as e:
            resolve_device(bad)
        assert e.value.code == "bad_device"


def test_amp_checks_and_run_device_scope() -> None:
    with pytest.raises(MergingError) as e:
        Precision("fp16").check(torch.device("cpu"))
    assert e.value.code == "bad_argument" and "CUDA" in e.value.message
    Precision("bf16").check(torch.device("cpu"))  # bf16 autocast exists on the CPU
    with use_device("cpu", "bf16") as d:
        assert d == current_device() == torch.device("cpu")
    assert current_device() == torch.device("cpu")


def test_bf16_autocast_fit_on_cpu_trains(digits_splits) -> None:  # type: ignore[no-untyped-def]
    from merging.arch import create_arch
    from merging.network import MultitaskNet
    from merging.train import TrainConfig, fit

    data = digits_splits.train.select_tasks(("parity",)).subset(list(range(32)))
    torch.manual_seed(0)
    net = MultitaskNet.single_task(data.tasks[0], create_arch("lenet", width_mult=0.5))
    before = [p.detach().clone() for p in net.parameters()]
    fit(net, data, TrainConfig(epochs=1, progress=False, device="cpu", amp="bf16"))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize(("n", "batch", "world"), [(10, 4, 2), (11, 4, 2), (7, 3, 2), (100, 64, 3), (5, 64, 2)])
def test_sharded_batches_cover_the_permutation_in_equal_steps(digits_splits, n, batch, world) -> None:  # type: ignore[no-untyped-def]
    data = digits_splits.train.subset(list(range(n)))
    shards = [list(data.batch_indices(batch, True, torch.Generator().manual_seed(1), r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == batch_count(n, batch, world)
    for step in zip(*shards, strict=True):
        assert len({len(idx) for idx in step}) == 1 and len(step[0]) >= 1  # equal, never empty
    seen = torch.cat([torch.cat(s) for s in shards])
    assert set(seen.tolist()) == set(range(n)) and len(seen) == -(-n // world) * world  # padding only wraps


def test_one_process_batches_are_unchanged(digits_splits) -> None:  # type: ignore[no-untyped-def]
    data = digits_splits.train
    got = list(data.batch_indices(64, True, torch.Generator().manual_seed(3)))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))
    want = [order[i : i + 64] for i in range(0, len(data), 64)]
    assert len(got) == len(want) == batch_count(len(data), 64)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
