"""A MobileNetV2-style bench model for 3x64x64 inputs (Fashion-MNIST upscaled to 64x64 RGB), 10 classes.

Inverted residual blocks: 1x1 expansion (factor 6) + BN + SiLU, depthwise 3x3 + BN + SiLU, 1x1 linear
bottleneck + BN (no activation), residual add where stride is 1 and widths match. A stride-2 stem and two more
stride-2 stages (64 -> 32 -> 16 -> 8), a 1x1 head conv, global average pool, linear. Depthwise convs tie their
channels to the expansion conv before them, and the residual adds tie the bottlenecks of a stage: DepGraph
prunes both kinds of group.

SiLU, not hard-swish, by default: measured here (ai-edge-litert 2.1.0, XNNPACK), the int8 model with
nn.Hardswish leaves every HARD_SWISH op outside the delegate (36 partitions): an earlier 88M-MAC version of
this network ran 9.7 ms in int8 against 1.2 ms in fp32 at 1 thread; with SiLU (delegated whole) 0.51 ms int8.
`MobileNetV2FM(act="hardswish")` builds the hard-swish one.
"""

from __future__ import annotations

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s), the MobileNetV2 paper's table with two stride-2
# stages fewer than for 224x224 inputs (the last stages run at 8x8) and somewhat wider middle stages: sized
# so that the unpruned int8 model takes >= 1 ms at 1 thread on the development host, checkpoint under 12 MB
SETTINGS = ((1, 24, 1, 1), (6, 40, 4, 1), (6, 48, 3, 2), (6, 88, 4, 2), (6, 120, 3, 1), (6, 160, 3, 1), (6, 320, 1, 1))
STEM, HEAD = 32, 640
INPUT = 64


ACTIVATIONS = {"hardswish": nn.Hardswish, "silu": nn.SiLU, "relu6": nn.ReLU6}


def _cba(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str | None = "silu") -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return [*layers, ACTIVATIONS[act]()] if act else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: str) -> None:
        super().__init__()
        mid = cin * expand
        layers = _cba(cin, mid, 1, act=act) if expand != 1 else []
        layers += _cba(mid, mid, 3, stride=stride, groups=mid, act=act)
        layers += _cba(mid, cout, 1, act=None)  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class MobileNetV2FM(nn.Module):
    def __init__(self, classes: int = 10, width: float = 1.0, act: str = "silu") -> None:
        super().__init__()
        cin = int(STEM * width)
        blocks: list[nn.Module] = [nn.Sequential(*_cba(3, cin, 3, stride=2, act=act))]
        for t, c, n, s in SETTINGS:
            cout = int(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, act))
                cin = cout
        blocks.append(nn.Sequential(*_cba(cin, HEAD, 1, act=act)))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(HEAD, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(self.dropout(x))


def build() -> MobileNetV2FM:
    torch.manual_seed(0)  # the same initial weights every time the factory is called
    return MobileNetV2FM().eval()
