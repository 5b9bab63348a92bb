"""Shared fixtures: tiny seeded models and the skip rules for capabilities a machine may lack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
torch.set_num_threads(2)


class TinyResNet(nn.Module):
    """A tiny residual CNN for 1x28x28 inputs: enough coupling (residual add, BN, classifier) for DepGraph."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.body = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
        )
        self.short = nn.Sequential(nn.Conv2d(w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w))
        self.head = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(self.body(x) + self.short(x)))


def tiny_resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet().eval()


@pytest.fixture
def tiny_model() -> TinyResNet:
    return tiny_resnet()


def has_fashion_mnist() -> bool:
    return (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()


needs_fmnist = pytest.mark.skipif(
    not has_fashion_mnist(), reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist"
)
