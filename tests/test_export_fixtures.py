"""Small 3-task networks of each family and their exported bundles, built once per test session.

Lowering with XNNPACK takes ~20 s per 7-method program on this machine, so the bundles are
cached here (a plain cache, shared by ``test_export*.py`` and ``test_runtime*.py``) instead of
being rebuilt per module.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from merging.arch import create_arch
from merging.network import MultitaskNet
from merging.tasks import TaskSpec
from mobile_export.export import ExportConfig, export_bundle

TASKS = (
    TaskSpec("a", "classes", ("a0", "a1", "a2")),
    TaskSpec("b", "classes", ("b0", "b1")),
    TaskSpec("c", "attributes", ("c0", "c1")),
)
A, B, AB, ABC = 1, 2, 3, 7  # task-set masks over (a, b, c): c lives only in the shared group
MAX_BATCH = 4

_ROOT = Path(tempfile.mkdtemp(prefix="pam-export-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


def lenet_net(seed: int = 0) -> MultitaskNet:
    """Groups {a},{b},{a,b},{a,b,c} at every layer; a wide shared dense layer so weights dominate
    the program size (the size-ratio test needs that)."""
    torch.manual_seed(seed)
    arch = create_arch("lenet", input_size=(16, 16))
    layout = [
        {A: 4, B: 4, AB: 6, ABC: 8},
        {A: 8, B: 8, AB: 8, ABC: 32},
        {A: 8, B: 8, AB: 8, ABC: 256},
    ]
    return MultitaskNet(TASKS, arch, layout, meta={"merger": "test", "test_accuracy": {"a": 90.0, "b": 80.0}}).eval()


def vgg_net(seed: int = 1) -> MultitaskNet:
    torch.manual_seed(seed)
    arch = create_arch("vgg", input_size=(16, 16), stages=((8,), (16,)), fc_widths=(32,))
    layout = [{A: 2, B: 2, AB: 3, ABC: 4}, {A: 4, B: 4, AB: 4, ABC: 8}, {A: 8, B: 8, AB: 8, ABC: 16}]
    net = MultitaskNet(TASKS, arch, layout, meta={"merger": "test"})
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is really tested
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def pruned(net: MultitaskNet) -> MultitaskNet:
    """Slice groups with ``select_channels``, removing the first layer's {b} group entirely."""
    net.select_channels(0, B, [])
    net.select_channels(0, AB, [0, 2])
    net.select_channels(1, A, [1, 3])
    net.select_channels(1, ABC, list(range(0, net.group_width(1, ABC), 2)))
    net.select_channels(2, AB, [0, 5])
    net.check_wiring()
    assert B not in net.layout[0]
    return net.eval()


NETS = {
    "lenet": lambda: lenet_net(),
    "lenet-pruned": lambda: pruned(lenet_net()),
    "vgg": lambda: vgg_net(),
    "vgg-pruned": lambda: pruned(vgg_net()),
    "vgg-pruned-3": lambda: pruned(vgg_net()),
}

# Lowering costs ~3-5 s per method here, mostly fixed per method, so the default suite's VGG
# bundle exports 3 combinations (through the removed group, and the widest); the slow suite
# exports all 7 for every kind.
COMBINATIONS: dict[str, list[str] | None] = {"vgg-pruned-3": ["b", "a+c", "a+b+c"]}

# What each bundle's export also measures (each measurement costs a lowering or child processes).
MEASURE = {"lenet": (True, False), "lenet-pruned": (False, True)}


def _export(kind: str, out: Path) -> None:
    size, memory = MEASURE.get(kind, (False, False))
    # lite only where a test reads model.ptl; one lowering process (bundles are already built side by side)
    cfg = ExportConfig(max_batch=MAX_BATCH, combinations=COMBINATIONS.get(kind), measure=size, memory=memory,
                       lite=kind == "lenet", workers=1)
    export_bundle(NETS[kind](), out, cfg, log=lambda *_: None)


# Bundles being exported by a child process (lowering is single-threaded, so on 2 cores a second
# bundle can be lowered while this process lowers the first). Networks are seeded, so the child's
# weights equal the ones NETS rebuilds here.
_PENDING: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}


def prefetch(*kinds: str) -> None:
    """Start exporting ``kinds`` in child processes; :func:`bundle` waits for them."""
    for kind in kinds:
        if kind in _PENDING or (_ROOT / kind).exists():
            continue
        log = _ROOT / f"{kind}.log"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.test_export_fixtures", kind, str(_ROOT / kind)],
                stdout=f, stderr=subprocess.STDOUT, env=env,
            )
        _PENDING[kind] = (proc, log)


@atexit.register
def _stop_children() -> None:
    for proc, _ in _PENDING.values():
        if proc.poll() is None:
            proc.kill()


@functools.cache
def bundle(kind: str) -> tuple[MultitaskNet, Path]:
    """(network, bundle dir) exported and verified by export itself (all combinations unless
    ``COMBINATIONS`` names a subset); built here, or by the child :func:`prefetch` started."""
    out = _ROOT / kind
    if kind in _PENDING:
        proc, log = _PENDING.pop(kind)
        if proc.wait(timeout=1800) != 0:
            raise RuntimeError(f"exporting {kind} in a child failed:\n{log.read_text(errors='replace')[-3000:]}")
    else:
        _export(kind, out)
    return NETS[kind](), out


def written_before_the_rename(src: Path, dst: Path) -> Path:
    """A copy of bundle ``src`` as versions before issue 21 wrote it: the expected outputs in
    ``reference.pt``, named by the manifest keys ``reference`` / ``reference_sha256``."""
    shutil.copytree(src, dst)
    (dst / "expected_outputs.pt").rename(dst / "reference.pt")
    raw = json.loads((dst / "manifest.json").read_text())
    assert raw.pop("expected_outputs") == "expected_outputs.pt"
    raw["reference"], raw["reference_sha256"] = "reference.pt", raw.pop("expected_outputs_sha256")
    (dst / "manifest.json").write_text(json.dumps(raw, indent=2))
    return dst


def scratch(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT))


if __name__ == "__main__":  # the child side of prefetch()
    torch.set_num_threads(1)
    _export(sys.argv[1], Path(sys.argv[2]))
