"""Bring your own networks: torchvision-trained single-task networks as zoo entries.

:func:`import_torchvision` takes a torchvision ``resnet18`` / ``resnet34`` (basic blocks) or
``mobilenet_v2`` (any ``width_mult``) whose classifier was replaced for one task, as a module, a
state dict or a ``.pt`` file (loaded weights-only, never unpickled otherwise), and returns the
equivalent single-task :class:`MultitaskNet` of the ``resnet`` / ``mobilenetv2`` family with every
tensor copied: same outputs in eval mode, ready for any merger.

Only the state dict is read (torchvision itself is never imported), so the structure comes from the
keys and shapes: widths, block counts, expansion ratios and the head size. Strides are not stored
in the weights: they are torchvision's (ResNet: 2 at the first block of stages 2-4; MobileNetV2:
its block table), so a network built with other strides or with ``replace_stride_with_dilation``
would import with wrong outputs; everything else that does not fit (a Bottleneck block, a
classifier with hidden layers, a missing or extra tensor, a wrong shape) is a :class:`MergingError`
naming the first key that does not fit.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from merging.arch import MOBILENET_V2_SETTINGS, ArchConfig, create_arch
from merging.blocks import GroupBlock
from merging.errors import MergingError, invariant
from merging.graph import GroupKey
from merging.network import MultitaskNet
from merging.tasks import TaskSpec

__all__ = ["TORCHVISION_ARCHS", "import_torchvision", "load_weights_file", "torchvision_state_dict"]

TorchvisionArch = Literal["resnet18", "resnet34", "mobilenet_v2"]
TORCHVISION_ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "mobilenet_v2")
_RESNET_BLOCKS: dict[str, tuple[int, ...]] = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# ImageNet normalisation: how torchvision's networks are conventionally fed
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Slot:
    """One torchvision conv (+ its BN) and the trunk layer whose block receives it."""

    conv: str  # module path of the conv, e.g. "layer1.0.conv1"
    bn: str  # module path of its BatchNorm, e.g. "layer1.0.bn1"
    layer: int


@dataclass(frozen=True)
class _Plan:
    name: str  # "resnet18", "resnet34", "resnet" (other basic-block depths), "mobilenet_v2"
    arch: ArchConfig
    slots: tuple[_Slot, ...]
    head: str  # module path of the classifier's Linear ("fc", "classifier.1")
    width_mult: float | None = None  # mobilenet_v2: torchvision's width_mult reproducing every width


# ----------------------------------------------------------------------------- sources
def load_weights_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A ``.pt`` state dict, loaded with ``weights_only=True``: a file holding anything but tensors
    and plain containers (a pickled module, arbitrary objects) is refused, never unpickled."""
    p = Path(path)
    if not p.is_file():
        raise MergingError("missing_weights", f"no weights file at {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know (a class, a function): that is a file
        # holding objects, never unpickled here; anything else is a file torch cannot read at all
        found = re.search(r"Unsupported (?:global|class):?\s+(?:GLOBAL\s+)?[\w.<>]+", str(e))
        if found is None:
            raise MergingError("bad_weights_file", f"{p} is not a torch weights file ({_first_line(e)})") from e
        raise MergingError(
            "not_weights_only",
            f"{p} is not a weights-only file: it holds objects beyond tensors ({found.group(0).strip()}), so it was "
            "refused and never unpickled; save the state dict instead: torch.save(model.state_dict(), path)",
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for truncated or foreign files
        raise MergingError("bad_weights_file", f"{p} is not a torch weights file ({_first_line(e)})") from e
    if not isinstance(obj, Mapping):
        raise MergingError("bad_weights_file", f"{p} holds a {type(obj).__name__}, not a state dict")
    return _as_state_dict(obj, str(p))


def _first_line(e: BaseException) -> str:
    """The informative line of a load error (for weights_only refusals, the unpickler's reason, not
    torch's general advice)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _as_state_dict(obj: Mapping[Any, Any], origin: str) -> dict[str, Tensor]:
    # training checkpoints often wrap the weights ({"state_dict": ...} / {"model": ...}) and
    # DataParallel prefixes every key with "module."
    for wrapper in ("state_dict", "model"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            obj = inner
            break
    state: dict[str, Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise MergingError("bad_weights_file",
                               f"{origin}: entry {k!r} is a {type(v).__name__}, not a tensor: not a state dict")
        state[k] = v
    if not state:
        raise MergingError("bad_weights_file", f"{origin}: the state dict is empty")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def torchvision_state_dict(source: Any) -> tuple[dict[str, Tensor], str]:
    """(state dict, where it came from) of a module (duck-typed: anything with ``state_dict()``),
    a mapping of tensors, or a path to a weights-only ``.pt`` file."""
    if isinstance(source, str | os.PathLike):
        return load_weights_file(source), str(source)
    if isinstance(source, Mapping):
        return _as_state_dict(source, "state dict"), "state dict"
    state_fn = getattr(source, "state_dict", None)
    if callable(state_fn):
        origin = type(source).__name__
        state = state_fn()
        if not isinstance(state, Mapping):
            raise MergingError("bad_source", f"{origin}.state_dict() returned a {type(state).__name__}")
        return _as_state_dict(state, origin), origin
    raise MergingError("bad_source", f"cannot import a {type(source).__name__}: give a module, a state dict or a "
                                     ".pt path")


# ----------------------------------------------------------------------------- structure
def _shape(state: Mapping[str, Tensor], key: str, ndim: int, what: str) -> tuple[int, ...]:
    if key not in state:
        raise MergingError("missing_key", f"{key} is missing: {what} needs it")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise MergingError("shape_mismatch", f"{key} has shape {list(shape)}: {what} needs a {ndim}-d tensor")
    return shape


def _detect(state: Mapping[str, Tensor], arch_name: str | None) -> str:
    found = ("resnet" if "layer1.0.conv1.weight" in state else
             "mobilenet_v2" if "features.1.conv.0.0.weight" in state else None)
    if arch_name is not None:
        if arch_name not in TORCHVISION_ARCHS:
            supported = ", ".join(TORCHVISION_ARCHS)
            raise MergingError("unsupported_network",
                               f"cannot import a torchvision {arch_name!r}: supported are {supported}")
        wanted = "mobilenet_v2" if arch_name == "mobilenet_v2" else "resnet"
        if found is not None and found != wanted:
            raise MergingError("unsupported_network", f"asked for {arch_name}, but the keys are those of a {found}")
        return wanted
    if found is None:
        first = ", ".join(list(state)[:3])
        raise MergingError(
            "unsupported_network",
            "not a torchvision resnet18/resnet34/mobilenet_v2 state dict: neither layer1.0.conv1.weight (ResNet) "
            f"nor features.1.conv.0.0.weight (MobileNetV2) is there; it starts with {first}",
        )
    return found


def _resnet_plan(state: Mapping[str, Tensor], arch_name: str | None, input_size: tuple[int, int]) -> _Plan:
    for key in state:  # a Bottleneck block (resnet50 and deeper) has a third conv
        if re.fullmatch(r"layer\d+\.\d+\.conv3\.weight", key):
            raise MergingError(
                "unsupported_block",
                f"{key}: a Bottleneck block (torchvision resnet50/101/152, wide_resnet, resnext); only "
                "basic-block ResNets (resnet18, resnet34) import into the resnet family",
            )
    stem = _shape(state, "conv1.weight", 4, "the ResNet stem")
    blocks: list[int] = []
    widths: list[int] = []
    for i in range(1, 5):
        widths.append(_shape(state, f"layer{i}.0.conv1.weight", 4, f"ResNet stage {i}")[0])
        n = 0
        while f"layer{i}.{n}.conv1.weight" in state:
            n += 1
        blocks.append(n)
    known: dict[tuple[int, ...], str] = {v: k for k, v in _RESNET_BLOCKS.items()}
    name = known.get(tuple(blocks), "resnet")  # another basic-block depth: imports too, named generically
    if arch_name is not None and tuple(blocks) != _RESNET_BLOCKS[arch_name]:
        raise MergingError("unsupported_network", f"asked for {arch_name} ({_RESNET_BLOCKS[arch_name]} blocks per "
                                                  f"stage), the state dict has {tuple(blocks)}")
    arch = create_arch("resnet", in_channels=stem[1], input_size=input_size, stages=tuple(widths),
                       blocks=tuple(blocks), stem="imagenet")
    slots = [_Slot("conv1", "bn1", 0)]
    l = 1
    for i, n in enumerate(blocks, 1):
        for j in range(n):
            p = f"layer{i}.{j}"
            names = [(f"{p}.conv1", f"{p}.bn1"), (f"{p}.conv2", f"{p}.bn2"),
                     (f"{p}.downsample.0", f"{p}.downsample.1")]
            k = 0
            while arch.layers[l].kind != "add":  # the block's convs, then its addition
                slots.append(_Slot(*names[k], l))
                l, k = l + 1, k + 1
            l += 1
    invariant(l == len(arch.layers), "every resnet layer has a torchvision name")
    return _Plan(name, arch, tuple(slots), "fc")


def _mobilenet_plan(state: Mapping[str, Tensor], input_size: tuple[int, int]) -> _Plan:
    table = [(t, s if j == 0 else 1) for t, _, n, s in MOBILENET_V2_SETTINGS for j in range(n)]
    stem = _shape(state, "features.0.0.weight", 4, "the MobileNetV2 stem")
    settings: list[tuple[int, int, int, int]] = []
    b = 1
    while f"features.{b}.conv.0.0.weight" in state:
        p = f"features.{b}.conv"
        expand = f"{p}.1.0.weight" in state  # pw-expand, dw, project (t > 1) vs dw, project (t = 1)
        first = _shape(state, f"{p}.0.0.weight", 4, f"block features.{b}")
        t = first[0] // first[1] if expand and first[1] and first[0] % first[1] == 0 else 1
        if expand and t < 2:
            raise MergingError("shape_mismatch", f"{p}.0.0.weight has shape {list(first)}: an expansion conv widens "
                                                 "its input by an integer ratio")
        out = _shape(state, f"{p}.2.weight" if expand else f"{p}.1.weight", 4, f"block features.{b}")[0]
        if b > len(table) or table[b - 1][0] != t:
            expected = f"expansion {table[b - 1][0]}" if b <= len(table) else "no such block"
            raise MergingError(
                "unsupported_network",
                f"features.{b}: inverted residual block with expansion {t} where torchvision's mobilenet_v2 has "
                f"{expected} (strides are not stored in the weights, so only its block table imports)",
            )
        settings.append((t, out, 1, table[b - 1][1]))
        b += 1
    if len(settings) != len(table):
        raise MergingError("missing_key", f"features.{b}.conv.0.0.weight is missing: torchvision's mobilenet_v2 has "
                                          f"{len(table)} inverted residual blocks, this state dict {len(settings)}")
    last = _shape(state, f"features.{b}.0.weight", 4, "the last 1x1 conv")[0]
    arch = create_arch("mobilenetv2", in_channels=stem[1], input_size=input_size, settings=tuple(settings),
                       stem=stem[0], last=last)
    slots = [_Slot("features.0.0", "features.0.1", 0)]
    l = 1
    for i, (t, *_) in enumerate(settings, 1):
        p = f"features.{i}.conv"
        names = ([(f"{p}.0.0", f"{p}.0.1")] if t != 1 else []) + [
            (f"{p}.{int(t != 1)}.0", f"{p}.{int(t != 1)}.1"),  # depthwise
            (f"{p}.{int(t != 1) + 1}", f"{p}.{int(t != 1) + 2}"),  # linear projection
        ]
        for conv, bn in names:
            slots.append(_Slot(conv, bn, l))
            l += 1
        if l < len(arch.layers) and arch.layers[l].kind == "add":
            l += 1
    slots.append(_Slot(f"features.{b}.0", f"features.{b}.1", l))
    invariant(l == len(arch.layers) - 1, "every mobilenetv2 layer has a torchvision name")
    return _Plan("mobilenet_v2", arch, tuple(slots), "classifier.1", _width_mult(arch, stem[0]))


def _width_mult(arch: ArchConfig, stem: int) -> float | None:
    """The torchvision ``width_mult`` whose rounded widths are these (the stem alone can be
    ambiguous: 0.35 and 0.5 both give 16), or None for custom widths."""
    for wm in (stem / 32, 0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, 2.0):
        if create_arch("mobilenetv2", in_channels=arch.in_channels, input_size=arch.input_size,
                       width_mult=wm).layers == arch.layers:
            return wm
    return None


# ----------------------------------------------------------------------------- import
def _targets(net: MultitaskNet, plan: _Plan) -> dict[str, tuple[Tensor, tuple[int, ...]]]:
    """torchvision key -> (tensor of ``net`` it fills, the shape it must have in torchvision)."""
    out: dict[str, tuple[Tensor, tuple[int, ...]]] = {}
    for slot in plan.slots:
        block = net.blocks[GroupKey(slot.layer, 1).name]
        invariant(isinstance(block, GroupBlock) and block.bn is not None, f"layer {slot.layer} is conv-BN")
        assert isinstance(block, GroupBlock) and block.bn is not None
        out[f"{slot.conv}.weight"] = (block.conv.weight, tuple(block.conv.weight.shape))
        for name in _BN_TENSORS:
            t = getattr(block.bn, name)
            out[f"{slot.bn}.{name}"] = (t, tuple(t.shape))
    head = net.head(net.task_names[0]).conv
    invariant(head.bias is not None, "an avgpool head has a bias")
    assert head.bias is not None
    out[f"{plan.head}.weight"] = (head.weight, tuple(head.weight.shape[:2]))
    out[f"{plan.head}.bias"] = (head.bias, tuple(head.bias.shape))
    return out


def _unexpected(key: str, plan: _Plan) -> MergingError:
    classifier = plan.head.split(".")[0]
    if key.split(".")[0] == classifier:
        hint = (f"the classifier must be a single Linear ({plan.head}); a classifier with hidden layers or "
                "other modules does not fit the family's head")
    else:
        hint = f"torchvision's {plan.name} has no such tensor"
    return MergingError("unexpected_key", f"{key}: {hint}")


def import_torchvision(
    source: Any,
    task: TaskSpec,
    arch_name: str | None = None,
    input_size: tuple[int, int] = (224, 224),
    preprocessing: Literal["imagenet"] | None = "imagenet",
) -> MultitaskNet:
    """A torchvision single-task network as a single-task :class:`MultitaskNet` with the same outputs.

    ``source``: a module (only its ``state_dict()`` is read), a state dict, or a ``.pt`` path
    (weights-only). ``arch_name``: ``resnet18``, ``resnet34`` or ``mobilenet_v2``, or None to
    detect it from the keys. ``input_size``: (height, width) the network will be run at (any size
    torchvision's network accepts; MACs are priced at it). ``preprocessing="imagenet"`` records
    torchvision's usual ImageNet normalisation in the model's meta (the export's manifest repeats it).
    """
    state, origin = torchvision_state_dict(source)
    h, w = (int(v) for v in input_size)
    family = _detect(state, arch_name)
    plan = _resnet_plan(state, arch_name, (h, w)) if family == "resnet" else _mobilenet_plan(state, (h, w))
    net = MultitaskNet.single_task(task, plan.arch)
    targets = _targets(net, plan)
    for key in state:  # the first tensor with no place in the family, in the state dict's order
        if key not in targets:
            raise _unexpected(key, plan)
    for key in targets:
        if key not in state and not key.endswith(".num_batches_tracked"):  # absent from pre-0.4 checkpoints
            raise MergingError("missing_key", f"{key} is missing: torchvision's {plan.name} has it")
    head_out = int(state[f"{plan.head}.weight"].shape[0])
    if head_out != task.out_dim:
        raise MergingError(
            "head_size",
            f"{plan.head}.weight has {head_out} outputs, task {task.name!r} has {task.out_dim} "
            f"{'classes' if task.kind == 'classes' else 'attributes'} ({', '.join(task.labels)})",
        )
    for key, tensor in state.items():
        want = targets[key][1]
        if tuple(tensor.shape) != want:
            raise MergingError("shape_mismatch", f"{key} has shape {list(tensor.shape)}, the {plan.name} built from "
                                                 f"the other tensors needs {list(want)}")
        if not (tensor.is_floating_point() or key.endswith(".num_batches_tracked")):
            raise MergingError("bad_weights_file", f"{key} holds {tensor.dtype} values, not floating point")
    with torch.no_grad():
        for key, tensor in state.items():
            target = targets[key][0]
            target.copy_(tensor.reshape(target.shape))
    net.meta["source"] = {"from": "torchvision", "arch": plan.name, "origin": origin}
    if plan.width_mult is not None:
        net.meta["source"]["width_mult"] = plan.width_mult
    if preprocessing == "imagenet" and plan.arch.in_channels == 3:
        net.meta["preprocessing"] = {"size": [h, w], "channels": plan.arch.in_channels,
                                     "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "invert": False}
    return net.eval()
