"""A ResNet-style bench model for 3x64x64 inputs (Fashion-MNIST upscaled to 64x64 RGB), 10 classes.

Basic blocks (two 3x3 conv + BN, residual add, ReLU), a stride-2 3x3 stem, three stages of 3, 3 and 2 blocks at
32x32, 16x16 and 8x8 (the last two open with a stride-2 block and a 1x1 projection shortcut), global average
pool, linear. Every residual add couples the channels of a stage, so Torch-Pruning's DepGraph has to prune
the stem, the blocks' second convs and the shortcuts together. Only ops that convert cleanly to TFLite.
"""

from __future__ import annotations

import torch
from torch import nn

# channels and basic blocks per stage: sized so that the unpruned int8 model takes >= 1 ms at 1 thread on the
# development host (x86 with VNNI, XNNPACK) while the checkpoint stays under 12 MB
WIDTHS, BLOCKS = (64, 128, 192), (3, 3, 2)
INPUT = 64


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNetFM(nn.Module):
    def __init__(self, classes: int = 10, widths: tuple[int, ...] = WIDTHS, blocks: tuple[int, ...] = BLOCKS) -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"ResNetFM: {len(widths)} stage widths for {len(blocks)} stages")
        cin = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, cin, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        for i, (cout, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build() -> ResNetFM:
    torch.manual_seed(0)  # the same initial weights every time the factory is called
    return ResNetFM().eval()
