"""A user's labelled images: `root/<class>/*.png|jpg|jpeg|bmp`, classes sorted, label = index."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError

log = logging.getLogger(__name__)

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def read_image(path: Path, *, size: tuple[int, int], channels: int) -> tuple[np.ndarray, bool, str | None]:
    """The image as HxWxC uint8, whether it was resized, and what it was converted from (None: nothing)."""
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)  # EXIF orientation applied
    return fit_image(raw, str(path), size=size, channels=channels)


def decode_bytes(
    data: bytes, where: str, *, size: tuple[int, int], channels: int
) -> tuple[np.ndarray, bool, str | None]:
    """`read_image` for an encoded image held in memory (a member of a tar shard); `where` names it in errors."""
    import cv2

    raw = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    return fit_image(raw, where, size=size, channels=channels)


def fit_image(raw: np.ndarray | None, where: str, *, size: tuple[int, int], channels: int
              ) -> tuple[np.ndarray, bool, str | None]:  # fmt: skip
    """A decoded image (cv2's BGR/BGRA/gray, any depth) as HxWxC uint8 of the model's size and channels, whether
    it was resized, and what it was converted from (None: nothing)."""
    import cv2

    if raw is None:
        raise DatasetError(f"{where}: cannot decode this image; remove it or replace it")
    converted = None
    if raw.dtype != np.uint8:
        converted = f"{raw.dtype} pixels"
        raw = cv2.convertScaleAbs(raw, alpha=255.0 / max(1.0, float(np.iinfo(raw.dtype).max)))
    have = 1 if raw.ndim == 2 else raw.shape[2]
    if have == 1:
        img = raw.reshape(raw.shape[0], raw.shape[1]) if channels == 1 else cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    elif channels == 1:
        img = cv2.cvtColor(raw, cv2.COLOR_BGRA2GRAY if have == 4 else cv2.COLOR_BGR2GRAY)
    else:
        img = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB if have == 4 else cv2.COLOR_BGR2RGB)
    if have != channels:
        converted = converted or {1: "grayscale", 3: "colour", 4: "colour with alpha"}.get(have, f"{have} channels")
    h, w = size
    resized = img.shape[:2] != (h, w)
    if resized:
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return img.reshape(h, w, channels), resized, converted


def load_image_folder(root: Path, *, size: tuple[int, int], channels: int) -> ImageSet:
    if channels not in (1, 3):
        raise DatasetError(f"{root}: images must have 1 or 3 channels, the model wants {channels}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class folders; expected {root}/<class>/<image files>")
    images, labels = [], []
    resized, converted = 0, Counter()
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in SUFFIXES:
                img, was_resized, was = read_image(path, size=size, channels=channels)
                images.append(img)
                labels.append(label)
                resized += was_resized
                if was:
                    converted[was] += 1
    if not images:
        raise DatasetError(f"{root}: no images ({', '.join(sorted(SUFFIXES))}) in the class folders")
    report_changes(root, len(images), resized, converted, size=size, channels=channels)
    return ImageSet(np.stack(images).astype(np.uint8), np.array(labels, dtype=np.int64), tuple(classes), str(root))


def report_changes(root: Path | str, n: int, resized: int, converted: Counter, *, size: tuple[int, int],
                    channels: int) -> None:  # fmt: skip
    """Say how many images were resized or converted to fit the model's input: never silently."""
    parts = []
    if resized:
        parts.append(f"{resized} of {n} resized to {size[0]}x{size[1]}")
    want = "grayscale" if channels == 1 else "RGB"
    parts += [f"{k} of {n} converted from {what} to {want}" for what, k in sorted(converted.items())]
    if parts:
        log.warning("%s: %s, the model's input (check this is what you meant)", root, "; ".join(parts))
