"""Stand-ins for torchvision's ``resnet18`` and ``mobilenet_v2``, for machines without torchvision.

Written from reading torchvision's ``models/resnet.py``, ``models/mobilenetv2.py`` and
``ops/misc.py`` (``Conv2dNormActivation``): the module tree, hence every state-dict key, and the
forward pass are torchvision's; nothing else (no weight init, no dilation, no custom norm layers).

- ResNet: ``conv1`` (7x7/2, no bias) ``bn1`` ReLU, max-pool 3/2 pad 1, ``layer1..4`` of basic
  blocks (``conv1`` 3x3 with the block's stride, ``bn1``, ReLU, ``conv2`` 3x3, ``bn2``, plus the
  input, or ``downsample = Sequential(conv 1x1 with the stride, BN)`` of it where the stride or the
  width changes; ReLU after the sum), global average pool, flatten, ``fc``.
- MobileNetV2: ``features[0]`` = conv 3x3/2-BN-ReLU6 as a Sequential (keys ``features.0.0``,
  ``features.0.1``); ``features[1..17]`` inverted residual blocks whose layers sit in ``.conv``
  (``[pw-expand Sequential(conv, BN, ReLU6) when t != 1], dw Sequential(conv, BN, ReLU6),
  conv 1x1, BN``), with the input added when the stride is 1 and the widths match;
  ``features[18]`` = conv 1x1-BN-ReLU6 to ``last_channel``; mean over the map, flatten,
  ``classifier = Sequential(Dropout(0.2), Linear)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


# ----------------------------------------------------------------------------- resnet18
class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != width:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(y + shortcut)


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        width = 64
        for i, (w, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(width, w, 2 if i > 0 and j == 0 else 1))
                width = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes)


# ----------------------------------------------------------------------------- mobilenet_v2
def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never below 90% of ``v``."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv2dNormActivation with BatchNorm2d and ReLU6: a Sequential (conv, bn, act); no conv bias."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_ch * expand_ratio)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(in_ch, hidden, kernel=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        width = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn_relu6(3, width, stride=2)]
        for t, c, n, s in SETTINGS:
            out = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(width, out, s if i == 0 else 1, t))
                width = out
        features.append(conv_bn_relu6(width, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes, width_mult)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics (so a misplaced tensor shows in the outputs), in eval mode,
    with the classifier scaled to outputs of standard deviation 1 (so an absolute tolerance means
    the same for every network: residual sums of random blocks otherwise grow to tens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=gen)))
        model.eval()
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        scale = model(torch.randn(4, 3, 32, 32, generator=gen)).std()
        last.weight.div_(scale)
        last.bias.div_(scale)
    return model
