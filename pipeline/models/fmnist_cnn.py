"""The default model: a compact residual CNN for 28x28 grayscale Fashion-MNIST (~22M MACs, ~140k params).

Only ops that convert cleanly to TFLite and map to the Edge TPU (conv, BN folded, ReLU, max pool, add,
mean, fully connected). The residual block couples three layers, so the pruner's DepGraph has real work.
"""

from __future__ import annotations

import torch
from torch import nn


def _cbr(cin: int, cout: int, k: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FmnistCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(1, 32), *_cbr(32, 32), nn.MaxPool2d(2))
        self.block = nn.Sequential(*_cbr(32, 64), nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64))
        self.shortcut = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64))
        self.head = nn.Sequential(
            nn.MaxPool2d(2),
            *_cbr(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.block(x) + self.shortcut(x))
        return self.head(x)


def build() -> FmnistCNN:
    return FmnistCNN().eval()
