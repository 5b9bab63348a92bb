"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, gzip)."""

from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError

if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec

ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")  # fmt: skip
_FILES = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x0803, 0x0801


def read_idx(path: Path, *, magic: int) -> np.ndarray:
    """An IDX array (big-endian magic, uint32 dims, raw uint8); DatasetError naming the file when broken."""
    if not path.is_file():
        raise DatasetError(
            f"{path}: Fashion-MNIST is not installed; run `apt-get install dataset-fashion-mnist` (or `make data`)"
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt gzip file ({exc}); reinstall dataset-fashion-mnist") from None
    if len(raw) < 8:
        raise DatasetError(f"{path}: truncated IDX header; reinstall dataset-fashion-mnist")
    got_magic, ndim = struct.unpack(">I", raw[:4])[0], raw[3]
    if got_magic != magic:
        raise DatasetError(f"{path}: not an IDX file of the expected kind (magic {got_magic:#06x}, want {magic:#06x})")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DatasetError(f"{path}: {len(body)} data bytes for dims {dims}; the file is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


@lru_cache(maxsize=4)
def _load(root: Path, split: str) -> ImageSet:
    stem = _FILES[split]
    images = read_idx(root / f"{stem}-images-idx3-ubyte.gz", magic=_IMAGES_MAGIC)
    labels = read_idx(root / f"{stem}-labels-idx1-ubyte.gz", magic=_LABELS_MAGIC)
    if images.ndim != 3 or len(images) != len(labels):
        raise DatasetError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
    return ImageSet(images[..., None].copy(), labels.astype(np.int64), CLASS_NAMES, f"fashion-mnist:{split}")


def load_fashion_mnist(split: Literal["train", "test"], *, root: Path = ROOT) -> ImageSet:
    if split not in _FILES:
        raise DatasetError(f"unknown Fashion-MNIST split {split!r}; valid: train, test")
    return _load(Path(root), split)


def fit_images(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 NHWC images resized (bilinear) to the model's (C, H, W) and their channel replicated to C."""
    import torch
    import torch.nn.functional as F

    c, h, w = shape
    if images.shape[1:3] != (h, w):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
        images = x.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if images.shape[3] != c:
        if images.shape[3] != 1:
            raise ValueError(f"cannot turn {images.shape[3]}-channel images into {c} channels")
        images = np.repeat(images, c, axis=3)
    return np.ascontiguousarray(images)


def fashion_mnist_for(spec: ModelSpec, split: str) -> ImageSet:
    """A Fashion-MNIST split ("train" or "test") at the model's input size and channels (all in memory)."""
    data = load_fashion_mnist(split)  # type: ignore[arg-type]
    c, h, w = spec.input_shape
    name = data.source if (c, h, w) == (1, 28, 28) else f"{data.source} resized to {c}x{h}x{w}"
    return ImageSet(fit_images(data.images, spec.input_shape), data.labels, data.class_names, name)
