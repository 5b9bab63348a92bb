"""An Inception-style bench model with branches for 3x32x32 inputs (Fashion-MNIST upscaled to 32x32 RGB, the
CIFAR-like shape), 10 classes: the structures the other bench models lack.

Each block runs three branches on its input and concatenates them: a 1x1 conv (SiLU); a 1x1 reduction then a
grouped 3x3 conv (4 groups, SiLU); a depthwise 5x5 conv then a 1x1 conv (hard-swish). A 1x1 projection of
the concatenation (BatchNorm, no activation) is added to the block's input (a strided depthwise 3x3 + 1x1
shortcut where the block halves the resolution), then hard-swish. For Torch-Pruning's DepGraph that is every
kind of coupling at once: the projection's input channels come from three branches (each pruned on its own
slice of the concat), a grouped conv's channels are pruned group-consistently, a depthwise conv's channels
are its input's, and the residual adds tie every projection and shortcut of a stage. Three stages at 32x32,
16x16 and 8x8, a 1x1 head, global average pool, linear. Only ops that convert cleanly to TFLite.
"""

from __future__ import annotations

import torch
from torch import nn

# (output channels, blocks, first stride) per stage; branch widths are shares of the output: sized so that
# the unpruned model takes about a millisecond at 1 thread in fp32 on the development host
STAGES = ((48, 2, 1), (96, 2, 2), (160, 2, 2))
STEM, HEAD, GROUPS = 32, 320, 4
INPUT = 32


def _cba(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.SiLU) -> list:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return [*layers, act()] if act else layers


class BranchBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        c1, c2, c3 = cout // 2, cout // 2, cout // 2  # each branch half the block's width: the concat is 1.5x
        mid = (cout // 2 // GROUPS) * GROUPS
        self.down: nn.Module = nn.Identity()
        if stride != 1:
            self.down = nn.Sequential(*_cba(cin, cin, 3, stride=stride, groups=cin, act=nn.Hardswish))
        self.branch1 = nn.Sequential(*_cba(cin, c1, 1))
        self.branch2 = nn.Sequential(*_cba(cin, mid, 1), *_cba(mid, c2, 3, groups=GROUPS))
        self.branch3 = nn.Sequential(*_cba(cin, cin, 5, groups=cin, act=nn.Hardswish),
                                     *_cba(cin, c3, 1, act=nn.Hardswish))  # fmt: skip
        self.project = nn.Sequential(*_cba(c1 + c2 + c3, cout, 1, act=None))
        self.shortcut: nn.Module = nn.Identity()
        if cin != cout:
            self.shortcut = nn.Sequential(*_cba(cin, cout, 1, act=None))
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        y = torch.cat([self.branch1(x), self.branch2(x), self.branch3(x)], dim=1)
        return self.act(self.project(y) + self.shortcut(x))


class BranchNetFM(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Sequential(*_cba(3, STEM, 3, act=nn.Hardswish))]
        cin = STEM
        for cout, n, stride in STAGES:
            for i in range(n):
                blocks.append(BranchBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        blocks.append(nn.Sequential(*_cba(cin, HEAD, 1, act=nn.Hardswish)))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(HEAD, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build() -> BranchNetFM:
    torch.manual_seed(0)  # the same initial weights every time the factory is called
    return BranchNetFM().eval()
