"""Checkpoints: round trip, and typed errors for corrupt or unsafe files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merging.checkpoint import load_model, save_model
from merging.errors import MergingError
from tests.conftest import random_net


class Evil:
    def __reduce__(self):  # a pickle that would run code if unpickled without weights_only
        return (print, ("pwned",))


def test_round_trip_is_exact(tmp_path: Path) -> None:
    net = random_net("vgg", 3, seed=4)
    path = save_model(net, tmp_path / "m")
    assert path.name == "m.json" and (tmp_path / "m.pt").is_file()
    back = load_model(path)
    x = torch.randn(2, 1, 8, 8)
    for t, v in net(x).items():
        assert torch.equal(back(x)[t], v)
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


@pytest.mark.parametrize("damage", ["flip", "truncate", "pickle", "not_dict", "json", "missing"])
def test_corrupt_checkpoints_are_typed_errors(tmp_path: Path, damage: str, capsys: pytest.CaptureFixture) -> None:
    net = random_net("lenet", 2, seed=1)
    cfg = save_model(net, tmp_path / "m")
    pt = tmp_path / "m.pt"
    meta = json.loads(cfg.read_text())
    if damage == "flip":
        data = bytearray(pt.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pt.write_bytes(bytes(data))
    elif damage == "truncate":
        pt.write_bytes(pt.read_bytes()[:100])
        meta["weights"].pop("sha256")
    elif damage == "pickle":
        torch.save({"x": Evil()}, pt)  # a real torch file whose pickle would call print()
        meta["weights"].pop("sha256")
    elif damage == "not_dict":
        torch.save([torch.zeros(1)], pt)
        meta["weights"].pop("sha256")
    elif damage == "json":
        cfg.write_text("{not json")
    elif damage == "missing":
        pt.unlink()
    if damage not in ("json", "missing", "flip"):
        cfg.write_text(json.dumps(meta))
    with pytest.raises(MergingError) as e:
        load_model(cfg)
    assert e.value.code in {"corrupt_checkpoint", "missing_checkpoint"}
    assert str(tmp_path) in e.value.message or "m." in e.value.message
    assert "pwned" not in capsys.readouterr().out
