"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, gzip)."""

from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError

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
