"""Tiny seeded models and a few real Fashion-MNIST images, for every test module.

Two residual shapes on purpose: TinyResNet joins its residual through a 1x1 shortcut conv after a max-pool
(DepGraph couples body and shortcut outputs), TinyResidualCNN through an identity add and downsamples with a
strided conv (the add couples the stem with the block)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.imageset import ImageSet
from pipeline.models.spec import ModelSpec

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


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


class TinyResidualCNN(nn.Module):
    """conv-BN-ReLU stem, a residual block (two conv-BN, add, ReLU), a strided conv, global pool, linear."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
        )
        self.down = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = self.down(x)
        return self.fc(torch.flatten(self.pool(x), 1))


SPEC = ModelSpec(
    name="tiny-residual-cnn",
    build=TinyResidualCNN,
    input_shape=(1, 28, 28),
    mean=(0.2860,),
    std=(0.3530,),
    class_names=CLASSES,
)


def has_fashion_mnist() -> bool:
    return all((FMNIST_DIR / f).is_file() for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"))


def read_fashion_mnist(split: str, n: int) -> ImageSet:
    """The first `n` images of a split, read straight from the IDX .gz files (only the bytes needed)."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz", "rb") as fh:
        magic, total, rows, cols = struct.unpack(">IIII", fh.read(16))
        assert magic == 2051, f"not an IDX image file (magic {magic})"
        n = min(n, total)
        images = np.frombuffer(fh.read(n * rows * cols), dtype=np.uint8).reshape(n, rows, cols, 1)
    with gzip.open(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz", "rb") as fh:
        magic, _ = struct.unpack(">II", fh.read(8))
        assert magic == 2049, f"not an IDX label file (magic {magic})"
        labels = np.frombuffer(fh.read(n), dtype=np.uint8).astype(np.int64)
    return ImageSet(images.copy(), labels, CLASSES, f"fashion-mnist:{split}[:{n}]")


def train_tiny(data: ImageSet, *, steps: int = 60, batch: int = 64, seed: int = 0) -> TinyResidualCNN:
    """Seeded Adam training for a few dozen steps: far from converged, but with real activation ranges."""
    torch.manual_seed(seed)
    model = TinyResidualCNN()
    x, y = SPEC.to_tensor(data.images), torch.from_numpy(data.labels)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def prune_cfg(
    *,
    metric: str = "macs",
    keep: float | None = None,
    channel_multiple: int = 8,
    importance: str = "l2",
    keep_layers=(),
    max_ratio: float = 0.8,
):
    """A checked `pruning:` profile section, as a profile would give it to the pruner."""
    from pipeline.targets import PruneTarget, Pruning

    return Pruning(target=PruneTarget(metric=metric, keep=keep), channel_multiple=channel_multiple,
                   importance=importance, keep_layers=tuple(keep_layers), max_layer_ratio=max_ratio)  # fmt: skip


def write_fmnist_folder(root: Path, *, pool: int, train: int, test: int, calibration: int = 40) -> Path:
    """`root/{train,test,calibration}/c<label>/NNNN.png` from real Fashion-MNIST: `train` and `calibration`
    images drawn (seeded) from the first `pool` training images, the first `test` test images."""
    import cv2

    train_set, test_set = read_fashion_mnist("train", pool), read_fashion_mnist("test", test)
    for split, imgs in (
        ("train", train_set.subset(train, seed=0)),
        ("test", test_set),
        ("calibration", train_set.subset(calibration, seed=1)),
    ):
        for i, (img, label) in enumerate(zip(imgs.images, imgs.labels, strict=True)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(folder / f"{i:04d}.png"), img[..., 0])
    return root
