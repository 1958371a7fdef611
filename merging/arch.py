"""Architecture families as typed configs, with a registry and a factory.

A network is a stack of *layers*; every layer is built from one block per group (see
``merging.network``). ``fc`` layers are convolutions whose kernel covers the whole feature map,
so the network stays 4-D until the final flatten of each head: that keeps one XNNPACK delegate
per exported method even with a dynamic batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from merging.errors import MergingError
from merging.registry import Registry

LayerKind = Literal["conv", "fc", "dw", "add"]
Activation = Literal["relu", "relu6", "none"]
HeadKind = Literal["conv", "avgpool"]


@dataclass(frozen=True)
class LayerSpec:
    """One trunk layer. ``conv``/``fc`` layers are dense over their input channels; ``dw`` is a
    depthwise conv (channel c reads only channel c of its source, so its width is its source's);
    ``add`` sums its source and ``skip`` layers channel by channel (all three equally wide)."""

    kind: LayerKind  # "conv": k x k convolution; "fc": dense layer over the whole feature map
    width: int  # output channels (neurons) of the single-task network at this layer
    kernel: int = 3  # conv kernel size (ignored for fc: the kernel is the map size)
    stride: int = 1  # conv stride
    padding: int = 1  # conv zero padding
    bn: bool = False  # BatchNorm after the conv (the conv then has no bias)
    pool: int = 1  # max-pool kernel after the activation (1: none)
    act: Activation = "relu"  # after BN (none: a linear bottleneck)
    source: int | None = None  # index of the layer read (None: the previous one)
    skip: int | None = None  # add only: the other addend's layer index
    pool_stride: int | None = None  # max-pool stride (None: the pool kernel)
    pool_padding: int = 0


@dataclass(frozen=True)
class ArchConfig:
    family: str  # registry name this config came from, e.g. "lenet"
    in_channels: int  # image channels (1 grayscale, 3 RGB)
    input_size: tuple[int, int]  # (height, width) the network is built for
    layers: tuple[LayerSpec, ...]  # trunk layers; task heads follow the last one
    head: HeadKind = "conv"  # conv: a dense layer over the last map; avgpool: global mean, then dense

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> ArchConfig:
        try:
            layers = tuple(LayerSpec(**layer) for layer in d["layers"])
            h, w = d["input_size"]
            return ArchConfig(str(d["family"]), int(d["in_channels"]), (int(h), int(w)), layers,
                              d.get("head", "conv"))
        except (KeyError, TypeError, ValueError) as e:
            raise MergingError("bad_config", f"malformed architecture config: {e}") from e

    def same_structure(self, other: ArchConfig) -> bool:
        """Equal up to layer widths (what mergers need: same depth, kernels, input)."""
        if (self.in_channels, self.input_size, len(self.layers), self.head) != (
            other.in_channels,
            other.input_size,
            len(other.layers),
            other.head,
        ):
            return False
        return all(replace(a, width=0) == replace(b, width=0) for a, b in zip(self.layers, other.layers, strict=True))

    def with_widths(self, widths: list[int]) -> ArchConfig:
        layers = tuple(replace(s, width=w) for s, w in zip(self.layers, widths, strict=True))
        return ArchConfig(self.family, self.in_channels, self.input_size, layers, self.head)


@dataclass(frozen=True)
class ResolvedLayer:
    """A layer with every spatial quantity fixed by the input size."""

    kernel: tuple[int, int]
    stride: int
    padding: int
    in_hw: tuple[int, int]  # feature map size read by the conv
    conv_hw: tuple[int, int]  # conv output size (where MACs are spent)
    out_hw: tuple[int, int]  # after pooling
    bn: bool
    pool: int
    fc: bool = field(default=False)
    kind: LayerKind = "conv"
    act: Activation = "relu"
    source: int = -1  # layer read (-1: the image)
    skip: int | None = None  # add only
    pool_stride: int = 1
    pool_padding: int = 0


def resolve(arch: ArchConfig) -> list[ResolvedLayer]:
    """Spatial shapes of every layer; the head then reads a map of ``out_hw`` of the last layer."""
    out: list[ResolvedLayer] = []
    for i, s in enumerate(arch.layers):
        src = i - 1 if s.source is None else s.source
        if not -1 <= src < i:
            raise MergingError("bad_config", f"layer {i} reads layer {src}: only earlier layers (or -1, the image)")
        h, w = arch.input_size if src < 0 else out[src].out_hw
        if s.kind == "add":
            if s.skip is None or not 0 <= s.skip < i or src < 0:
                raise MergingError("bad_config", f"layer {i}: an add needs a source and an earlier skip layer")
            if out[s.skip].out_hw != (h, w) or arch.layers[s.skip].width != s.width != arch.layers[src].width:
                raise MergingError("bad_config", f"layer {i} adds layers {src} and {s.skip} of different shapes")
        if s.kind == "dw" and (src < 0 or arch.layers[src].width != s.width):
            raise MergingError("bad_config", f"layer {i}: a depthwise conv is as wide as the layer it reads")
        if s.kind == "fc":
            kernel, stride, padding = (h, w), 1, 0
        elif s.kind == "add":
            kernel, stride, padding = (1, 1), 1, 0
        else:
            kernel, stride, padding = (s.kernel, s.kernel), s.stride, s.padding
        ch = (h + 2 * padding - kernel[0]) // stride + 1
        cw = (w + 2 * padding - kernel[1]) // stride + 1
        if ch < 1 or cw < 1:
            raise MergingError("bad_config", f"layer {i} gets a {h}x{w} map: too small for its kernel")
        ps = s.pool_stride or s.pool
        if s.pool > 1:
            oh = (ch + 2 * s.pool_padding - s.pool) // ps + 1
            ow = (cw + 2 * s.pool_padding - s.pool) // ps + 1
        else:
            oh, ow = ch, cw
        if oh < 1 or ow < 1:
            raise MergingError("bad_config", f"layer {i} pools a {ch}x{cw} map away")
        out.append(ResolvedLayer(kernel, stride, padding, (h, w), (ch, cw), (oh, ow), s.bn, s.pool, s.kind == "fc",
                                 s.kind, s.act, src, s.skip, ps, s.pool_padding))
    return out


ArchFactory = Callable[..., ArchConfig]
_REGISTRY: Registry[ArchFactory] = Registry("arch", "architecture")
register_arch = _REGISTRY.register


def list_archs() -> list[str]:
    return sorted(_REGISTRY.names())


def create_arch(name: str, **kwargs: Any) -> ArchConfig:
    return _REGISTRY.get(name)(**kwargs)


def _scaled(base: int, mult: float) -> int:
    return max(1, round(base * mult))


@register_arch("lenet")
def lenet(
    in_channels: int = 1, input_size: tuple[int, int] = (8, 8), width_mult: float = 1.0, fc_width: int = 96
) -> ArchConfig:
    """LeNet-5 style: two conv + pool stages, one hidden dense layer, then the heads.

    Default widths (24, 48, 96) reach >= 98% test accuracy on every digits task.
    """
    return ArchConfig(
        "lenet",
        in_channels,
        tuple(input_size),  # type: ignore[arg-type]
        (
            LayerSpec("conv", _scaled(24, width_mult), kernel=3, padding=1, pool=2),
            LayerSpec("conv", _scaled(48, width_mult), kernel=3, padding=1, pool=2),
            LayerSpec("fc", _scaled(fc_width, width_mult)),
        ),
    )


@register_arch("vgg")
def vgg(
    in_channels: int = 1,
    input_size: tuple[int, int] = (8, 8),
    width_mult: float = 1.0,
    stages: tuple[tuple[int, ...], ...] = ((16, 16), (32, 32), (64,)),
    fc_widths: tuple[int, ...] = (64, 64),
) -> ArchConfig:
    """VGG style: stages of conv-BN-ReLU with a max-pool at the end of each stage, then dense layers."""
    layers: list[LayerSpec] = []
    h = min(input_size)
    for stage in stages:
        for j, width in enumerate(stage):
            last = j == len(stage) - 1
            pool = 2 if last and h >= 2 else 1
            layers.append(LayerSpec("conv", _scaled(width, width_mult), kernel=3, padding=1, bn=True, pool=pool))
        h = h // 2 if h >= 2 else h
    layers.extend(LayerSpec("fc", _scaled(w, width_mult)) for w in fc_widths)
    return ArchConfig("vgg", in_channels, tuple(input_size), tuple(layers))  # type: ignore[arg-type]


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding for MobileNetV2 (so width-scaled torchvision models import)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


@register_arch("resnet")
def resnet(
    in_channels: int = 3,
    input_size: tuple[int, int] = (32, 32),
    width_mult: float = 1.0,
    stages: tuple[int, ...] = (16, 32, 64, 128),
    blocks: tuple[int, ...] = (2, 2, 2, 2),
    stem: Literal["small", "imagenet"] = "small",
) -> ArchConfig:
    """ResNet with basic blocks (conv-BN-ReLU, conv-BN, + the block's input, ReLU); a 1x1 conv-BN
    projects the input where a stage changes width or stride. ``stages=(64, 128, 256, 512)``,
    ``stem="imagenet"`` is torchvision's ``resnet18``; the default is its quarter width with a
    3x3 stem for 32-64 pixel inputs."""
    widths = [_scaled(w, width_mult) for w in stages]
    if stem == "imagenet":
        layers = [LayerSpec("conv", widths[0], kernel=7, stride=2, padding=3, bn=True, pool=3, pool_stride=2,
                            pool_padding=1)]
    else:
        layers = [LayerSpec("conv", widths[0], kernel=3, padding=1, bn=True)]
    x, width = 0, widths[0]  # the layer holding the current block input, and its width
    for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            a = len(layers)
            layers.append(LayerSpec("conv", w, kernel=3, stride=stride, padding=1, bn=True, source=x))
            layers.append(LayerSpec("conv", w, kernel=3, padding=1, bn=True, act="none", source=a))
            skip = x
            if stride != 1 or width != w:
                layers.append(LayerSpec("conv", w, kernel=1, stride=stride, padding=0, bn=True, act="none", source=x))
                skip = len(layers) - 1
            layers.append(LayerSpec("add", w, source=a + 1, skip=skip))
            x, width = len(layers) - 1, w
    return ArchConfig("resnet", in_channels, tuple(input_size), tuple(layers), "avgpool")  # type: ignore[arg-type]


MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    # expansion t, output channels c, repeats n, first stride s (torchvision's table)
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


@register_arch("mobilenetv2")
def mobilenetv2(
    in_channels: int = 3,
    input_size: tuple[int, int] = (32, 32),
    width_mult: float = 1.0,
    settings: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_SETTINGS,
    stem: int = 32,
    last: int = 1280,
    stem_stride: int = 2,
) -> ArchConfig:
    """MobileNetV2: inverted residual blocks (1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1
    project-BN, + the block's input when shapes allow), then a 1x1 conv-BN-ReLU6 and global
    average pooling. The defaults are torchvision's ``mobilenet_v2`` (its ``width_mult`` rounding
    included); ``settings`` and ``stem_stride`` shrink it for small inputs."""
    width = _divisible(stem * width_mult)
    layers = [LayerSpec("conv", width, kernel=3, stride=stem_stride, padding=1, bn=True, act="relu6")]
    x = 0
    for t, c, n, s in settings:
        out = _divisible(c * width_mult)
        for j in range(n):
            stride = s if j == 0 else 1
            hidden = round(width * t)
            src = x
            if t != 1:
                layers.append(LayerSpec("conv", hidden, kernel=1, padding=0, bn=True, act="relu6", source=x))
                src = len(layers) - 1
            layers.append(LayerSpec("dw", hidden, kernel=3, stride=stride, padding=1, bn=True, act="relu6", source=src))
            layers.append(LayerSpec("conv", out, kernel=1, padding=0, bn=True, act="none", source=len(layers) - 1))
            if stride == 1 and width == out:
                layers.append(LayerSpec("add", out, source=len(layers) - 1, skip=x, act="none"))
            x, width = len(layers) - 1, out
    layers.append(LayerSpec("conv", _divisible(last * max(1.0, width_mult)), kernel=1, padding=0, bn=True,
                            act="relu6", source=x))
    return ArchConfig("mobilenetv2", in_channels, tuple(input_size), tuple(layers), "avgpool")  # type: ignore[arg-type]
