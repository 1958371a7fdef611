"""The single-task zoo on the bundled digits, and the CLI around it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merging.checkpoint import load_model
from merging.cost import combination_cost
from merging.train import evaluate
from merging.zoo import load_zoo
from pam_app.cli import main


@pytest.mark.slow  # trains the default zoo (~1 min): a quality check
def test_every_task_reaches_97_percent(digits_zoo, digits_splits) -> None:
    zoo, _ = digits_zoo  # training time is a benchmark's business (a shared machine makes it noise here)
    index = json.loads((zoo / "zoo.json").read_text())
    assert set(index["tasks"]) == {"digit", "parity", "large", "prime", "loop"}
    for net in load_zoo(zoo):
        t = net.task_names[0]
        acc = evaluate(net, digits_splits.test)[t]
        assert acc >= 97.0, (t, acc)
        assert abs(acc - index["tasks"][t]["test_accuracy"]) < 1e-9
        assert index["tasks"][t]["macs"] == combination_cost(net).macs


def test_training_is_deterministic_for_a_seed(digits_splits) -> None:
    from merging.arch import create_arch
    from merging.train import TrainConfig, train_single_task

    data = digits_splits.train.subset(list(range(200)))
    task = data.tasks[1]
    a = train_single_task(task, create_arch("lenet"), data, TrainConfig(epochs=2, progress=False, seed=5))
    b = train_single_task(task, create_arch("lenet"), data, TrainConfig(epochs=2, progress=False, seed=5))
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k


def test_pam_info_prints_every_combination(digits_splits, tmp_path: Path, capsys) -> None:
    from merging.arch import create_arch
    from merging.train import TrainConfig
    from merging.zoo import train_zoo

    zoo = tmp_path / "zoo"  # one epoch: the table's figures, not accuracy, are under test
    train_zoo(digits_splits, create_arch("lenet"), TrainConfig(epochs=1, progress=False), zoo, verbose=False)
    assert main(["info", str(zoo / "digit.json")]) == 0
    out = capsys.readouterr().out
    macs = combination_cost(load_model(zoo / "digit.json")).macs
    assert f"{macs:,}" in out
    assert main(["info", str(zoo / "parity.json"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == ["parity"]


def test_cli_reports_user_errors_cleanly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pam_app", "train", "--dataset", "imagenet", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown dataset 'imagenet'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "pam_app", "info", str(tmp_path / "nothing.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "no model config" in proc.stderr
