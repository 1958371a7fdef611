"""Importing torchvision-trained single-task networks (issue 14, item 5): same outputs, mergeable,
exportable; anything that does not fit is a clear error naming the first key.

torchvision is not importable on this machine (see docs/import.md), so the reference is
``tests/torchvision_reference.py``: torchvision's module tree and forward pass rewritten from its
source. The same checks run against torchvision itself wherever it imports.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from merging.arch import create_arch
from merging.data.base import MultitaskData
from merging.errors import MergingError
from merging.importers import import_torchvision
from merging.mergers.base import create_merger
from merging.network import MultitaskNet
from merging.tasks import TaskSpec
from merging.zoo import load_zoo
from tests import torchvision_reference as tv
from tests.conftest import assert_bundle_matches_eager

ATOL = 1e-5


def classes(name: str, n: int) -> TaskSpec:
    return TaskSpec(name, "classes", tuple(f"{name}{i}" for i in range(n)))


def max_diff(ref: nn.Module, net: MultitaskNet, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = ref(x)
        (got,) = net(x).values()
    assert got.shape == want.shape
    return float((got - want).abs().max())


@pytest.fixture(scope="module")
def resnet18_7() -> nn.Module:
    return tv.randomise(tv.resnet18(num_classes=7), seed=1)


@pytest.fixture(scope="module")
def mobilenet_v2_3() -> nn.Module:
    return tv.randomise(tv.mobilenet_v2(num_classes=3), seed=2)


# ----------------------------------------------------------------------------- the reference itself
def test_reference_modules_have_torchvisions_state_dict_keys(resnet18_7, mobilenet_v2_3) -> None:
    r, m = resnet18_7.state_dict(), mobilenet_v2_3.state_dict()
    # torchvision's counts: resnet18 has 62 parameter tensors + 60 BN buffers (20 convs, 20 BNs, fc);
    # mobilenet_v2 has 158 + 156 (52 convs, 52 BNs, classifier.1)
    assert (len(r), len(m)) == (122, 314)
    for key in ("conv1.weight", "bn1.num_batches_tracked", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.running_mean", "layer4.1.bn2.running_var", "fc.weight", "fc.bias"):
        assert key in r, key
    assert "layer1.0.downsample.0.weight" not in r  # stage 1 keeps stride and width
    for key in ("features.0.0.weight", "features.0.1.running_mean", "features.1.conv.0.0.weight",
                "features.1.conv.1.weight", "features.1.conv.2.running_var", "features.2.conv.0.0.weight",
                "features.2.conv.1.0.weight", "features.2.conv.2.weight", "features.2.conv.3.bias",
                "features.17.conv.3.num_batches_tracked", "features.18.0.weight", "features.18.1.weight",
                "classifier.1.weight", "classifier.1.bias"):
        assert key in m, key
    assert "features.19.0.weight" not in m and "classifier.0.weight" not in m  # Dropout has no tensors
    assert tuple(m["features.18.0.weight"].shape) == (1280, 320, 1, 1)
    assert tuple(m["features.1.conv.0.0.weight"].shape) == (32, 1, 3, 3)  # depthwise
    half = tv.mobilenet_v2(num_classes=3, width_mult=0.5).state_dict()
    assert tuple(half["features.0.0.weight"].shape) == (16, 3, 3, 3)  # rounded to multiples of 8
    assert tuple(half["features.18.0.weight"].shape) == (1280, 160, 1, 1)  # last width never shrinks


# ----------------------------------------------------------------------------- same outputs
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2-1.0", "mobilenet_v2-0.5"])
def test_imported_network_gives_the_reference_outputs(name, resnet18_7, mobilenet_v2_3) -> None:
    if name == "resnet18":
        ref, task = resnet18_7, classes("scene", 7)
        expected = create_arch("resnet", stages=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem="imagenet",
                               input_size=(64, 64))
    else:
        wm = float(name.split("-")[1])
        ref = mobilenet_v2_3 if wm == 1.0 else tv.randomise(tv.mobilenet_v2(num_classes=3, width_mult=wm), seed=3)
        task = classes("mood", 3)
        expected = create_arch("mobilenetv2", width_mult=wm, input_size=(64, 64))
    net = import_torchvision(ref, task, input_size=(64, 64))
    assert net.arch == expected  # widths, block structure and head inferred from the state dict
    if name != "resnet18":
        assert net.meta["source"]["width_mult"] == float(name.split("-")[1])
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    diff = max_diff(ref, net, x)
    print(f"{name}: max |imported - reference| = {diff:.2e}")
    assert diff <= ATOL
    # every buffer came along (a missing one would still be allclose on some inputs)
    bn = net.block(0, 1).bn
    assert bn is not None and bn.num_batches_tracked is not None
    assert int(bn.num_batches_tracked) == int(ref.state_dict()[
        "bn1.num_batches_tracked" if name == "resnet18" else "features.0.1.num_batches_tracked"])


def test_the_comparison_sees_one_misplaced_tensor(resnet18_7) -> None:
    state = {k: v.clone() for k, v in resnet18_7.state_dict().items()}
    state["layer4.1.bn2.running_mean"] += 0.5  # one BN statistic off
    net = import_torchvision(state, classes("scene", 7), input_size=(32, 32))
    assert max_diff(resnet18_7, net, torch.randn(2, 3, 32, 32)) > 1e-3


def test_a_weights_only_file_and_a_state_dict_import_alike(resnet18_7, tmp_path) -> None:
    path = tmp_path / "scene.pt"
    torch.save(resnet18_7.state_dict(), path)
    task = classes("scene", 7)
    a = import_torchvision(path, task, "resnet18", input_size=(32, 32))
    b = import_torchvision({"state_dict": {f"module.{k}": v for k, v in resnet18_7.state_dict().items()}}, task,
                           input_size=(32, 32))  # a training checkpoint of a DataParallel module
    assert a.meta["source"]["origin"] == str(path)
    x = torch.randn(2, 3, 32, 32)
    assert max_diff(resnet18_7, a, x) <= ATOL and max_diff(resnet18_7, b, x) <= ATOL


def _torchvision_models() -> Any:
    try:
        import torchvision.models as models  # type: ignore[import-not-found,unused-ignore]
    except Exception as e:  # not installed, or a build whose C extension does not load beside this torch
        pytest.skip(f"torchvision does not import here: {type(e).__name__}: {e}")
    return models


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_real_torchvision_network_imports_with_the_same_outputs(name) -> None:
    models = _torchvision_models()
    k = 7 if name == "resnet18" else 3
    ref = tv.randomise(getattr(models, name)(weights=None, num_classes=k), seed=4)
    ours = getattr(tv, name)(num_classes=k)
    assert set(ref.state_dict()) == set(ours.state_dict())  # the reference's keys are torchvision's
    net = import_torchvision(ref, classes("task", k), input_size=(64, 64))
    assert max_diff(ref, net, torch.randn(2, 3, 64, 64)) <= ATOL
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the reference computes what torchvision computes
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- a zoo entry for every merger
def _run_cli(argv: list[str]) -> None:
    from pam_app.commands_import import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert args.func(args) == 0


def test_cli_imports_two_networks_into_a_zoo_that_merges_and_reproduces_them(tmp_path, capsys) -> None:
    # two mobilenet_v2 at width 0.5 (small files); the merger does not care about the family
    refs = {"scene": tv.randomise(tv.mobilenet_v2(num_classes=7, width_mult=0.5), seed=5),
            "mood": tv.randomise(tv.mobilenet_v2(num_classes=3, width_mult=0.5), seed=6)}
    for name, ref in refs.items():
        torch.save(ref.state_dict(), tmp_path / f"{name}-weights.pt")
        labels = ",".join(f"{name}{i}" for i in range(7 if name == "scene" else 3))
        _run_cli(["import-torchvision", str(tmp_path / f"{name}-weights.pt"), "--task", name, "--labels", labels,
                  "--input-size", "32x32", "--out", str(tmp_path / "zoo" / f"{name}.json")])
    out = capsys.readouterr().out
    assert "imported torchvision mobilenet_v2 (width_mult 0.5) for task 'mood' (3 classes) at 32x32" in out
    nets = load_zoo(tmp_path / "zoo", ("scene", "mood"))  # through the checkpoint files, as `pam merge` reads them
    assert nets[1].meta["source"]["origin"] == str(tmp_path / "mood-weights.pt")
    assert nets[0].meta["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    data = MultitaskData(nets[0].tasks, torch.zeros(1, 3, 32, 32), {"scene": torch.zeros(1).long()})
    merged = create_merger("separate").merge(nets, data)
    merged.check_wiring()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        both = merged(x)
        for name, ref in refs.items():
            want = ref(x)
            assert float((both[name] - want).abs().max()) <= ATOL
            (alone,) = merged.for_combination([name])(x)
            assert float((alone - want).abs().max()) <= ATOL
    with pytest.raises(MergingError) as e:  # the output must not replace the file it imports
        _run_cli(["import-torchvision", str(tmp_path / "zoo" / "mood.pt"), "--task", "mood", "--labels", "a,b,c",
                  "--input-size", "32", "--out", str(tmp_path / "zoo" / "mood.json")])
    assert e.value.code == "bad_argument"


@pytest.mark.slow
def test_an_imported_pair_exports_and_every_method_matches_eager(tmp_path) -> None:
    from mobile_export.export import ExportConfig, export_bundle
    from mobile_export.runtime import BundleRuntime

    refs = [tv.randomise(tv.resnet18(num_classes=k), seed=7 + k) for k in (3, 2)]
    nets = [import_torchvision(r, classes(f"t{i}", k), input_size=(32, 32))
            for i, (r, k) in enumerate(zip(refs, (3, 2), strict=True))]
    merged = create_merger("separate").merge(nets, MultitaskData(nets[0].tasks, torch.zeros(1, 3, 32, 32),
                                                                 {"t0": torch.zeros(1).long()}))
    export_bundle(merged, tmp_path / "bundle", ExportConfig(force=True), log=lambda *_: None)
    rt = BundleRuntime(tmp_path / "bundle")
    x = torch.randn(2, 3, 32, 32)
    assert_bundle_matches_eager(rt, merged, x, {"t0", "t1", "t0+t1"})
    with torch.no_grad():  # and through the bundle the imported networks still give torchvision's outputs
        for i, ref in enumerate(refs):
            (g,) = rt.run(f"t{i}", x)
            torch.testing.assert_close(torch.as_tensor(g), ref(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- clear errors
def _error(source: Any, task: TaskSpec, **kw: Any) -> MergingError:
    with pytest.raises(MergingError) as e:
        import_torchvision(source, task, input_size=(32, 32), **kw)
    return e.value


def _edited(ref: nn.Module, edit: Callable[[dict[str, torch.Tensor]], object]) -> dict[str, torch.Tensor]:
    state = dict(ref.state_dict())
    edit(state)
    return state


def test_a_bottleneck_block_is_refused_naming_its_third_conv(resnet18_7) -> None:
    def bottleneck(s: dict[str, torch.Tensor]) -> None:  # resnet50's layer1.0: conv1 1x1, conv2 3x3, conv3 1x1
        s["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
        s["layer1.0.conv3.weight"] = torch.zeros(256, 64, 1, 1)
        s.update({f"layer1.0.bn3.{k}": torch.zeros(256) for k in ("weight", "bias", "running_mean", "running_var")})

    err = _error(_edited(resnet18_7, bottleneck), classes("scene", 7))
    assert err.code == "unsupported_block" and "layer1.0.conv3.weight" in str(err) and "Bottleneck" in str(err)


def test_a_missing_tensor_is_named(resnet18_7, mobilenet_v2_3) -> None:
    err = _error(_edited(resnet18_7, lambda s: s.pop("layer3.1.bn1.running_var")), classes("scene", 7))
    assert err.code == "missing_key" and "layer3.1.bn1.running_var" in str(err)
    err = _error(_edited(mobilenet_v2_3, lambda s: s.pop("features.18.0.weight")), classes("mood", 3))
    assert err.code == "missing_key" and "features.18.0.weight" in str(err)


def test_a_head_of_the_wrong_size_is_refused(resnet18_7) -> None:
    err = _error(resnet18_7, classes("mood", 3))
    assert err.code == "head_size" and "fc.weight has 7 outputs" in str(err) and "3 classes" in str(err)


def test_a_wrong_shape_and_an_unknown_tensor_are_named(resnet18_7, mobilenet_v2_3) -> None:
    err = _error(_edited(resnet18_7, lambda s: s.update({"layer2.1.conv1.weight": torch.zeros(128, 128, 1, 1)})),
                 classes("scene", 7))
    assert err.code == "shape_mismatch" and "layer2.1.conv1.weight" in str(err)
    err = _error(_edited(resnet18_7, lambda s: s.update({"layer1.0.downsample.0.weight": torch.zeros(64, 64, 1, 1)})),
                 classes("scene", 7))
    assert err.code == "unexpected_key" and "layer1.0.downsample.0.weight" in str(err)
    err = _error(mobilenet_v2_3, classes("mood", 3), arch_name="resnet18")
    assert err.code == "unsupported_network" and "mobilenet_v2" in str(err)
    err = _error({"conv.weight": torch.zeros(8, 3, 3, 3)}, classes("mood", 3))
    assert err.code == "unsupported_network" and "conv.weight" in str(err)


def test_a_classifier_with_hidden_layers_is_refused(mobilenet_v2_3, resnet18_7) -> None:
    m = tv.mobilenet_v2(num_classes=3)
    m.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 3), nn.ReLU(), nn.Dropout(0.2), nn.Linear(3, 3))
    err = _error(m, classes("mood", 3))
    assert err.code == "unexpected_key" and "classifier.4.weight" in str(err) and "hidden layers" in str(err)
    r = tv.resnet18(num_classes=7)
    r.fc = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 7))  # type: ignore[assignment]
    err = _error(r, classes("scene", 7))
    assert err.code == "unexpected_key" and "fc.0.weight" in str(err)


MARKER: list[str] = []


def _unpickled(path: str) -> str:
    """Runs only if the file is unpickled: leaves a trace."""
    Path(path).write_text("code ran")
    MARKER.append(path)
    return path


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpickled, (self.path,)


def test_a_file_that_is_not_weights_only_is_refused_without_unpickling_it(tmp_path, resnet18_7) -> None:
    trace = tmp_path / "unpickled.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": _Payload(trace)}, evil)
    err = _error(evil, classes("scene", 7))
    assert err.code == "not_weights_only" and "state_dict()" in str(err)
    assert not trace.exists() and not MARKER
    whole = tmp_path / "module.pt"
    torch.save(resnet18_7, whole)  # a pickled module, not a state dict
    assert _error(whole, classes("scene", 7)).code == "not_weights_only"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert _error(tmp_path / "junk.pt", classes("scene", 7)).code == "bad_weights_file"
    assert _error(tmp_path / "absent.pt", classes("scene", 7)).code == "missing_weights"


@pytest.mark.slow  # PAM's calibration over ~5,000 channels: 1-3 minutes on two busy cores
def test_pam_regroups_two_imported_networks_and_keeps_them_exact_when_nothing_is_dropped() -> None:
    refs = {"scene": tv.randomise(tv.mobilenet_v2(num_classes=7, width_mult=0.5), seed=5),
            "mood": tv.randomise(tv.mobilenet_v2(num_classes=3, width_mult=0.5), seed=6)}
    nets = [import_torchvision(ref, TaskSpec(name, "classes", tuple(f"{name}{i}" for i in range(7 if name == "scene"
                                                                                             else 3))),
                               input_size=(32, 32)) for name, ref in refs.items()]
    calib = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        labelled = MultitaskData(tuple(n.tasks[0] for n in nets), calib,
                                 {name: ref(calib).argmax(1) for name, ref in refs.items()})
    merged = create_merger("pam", consistency="expand", drop_irrelevant=False, calib_size=64).merge(nets, labelled)
    assert merged.meta["pam"]["exact_tasks"] == ["scene", "mood"]
    assert any(bin(m).count("1") == 2 for groups in merged.layout for m in groups)  # some channels serve both
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = merged(x)
        for name, ref in refs.items():
            assert float((out[name] - ref(x)).abs().max()) <= ATOL
