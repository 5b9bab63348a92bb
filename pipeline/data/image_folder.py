"""A user's labelled images: `root/<class>/*.png|jpg|jpeg|bmp`, classes sorted, label = index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def _read(path: Path, *, size: tuple[int, int], channels: int) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"{path}: cannot decode this image; remove it or replace it")
    if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = size
    if img.shape[:2] != (h, w):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return img.reshape(h, w, channels)


def load_image_folder(root: Path, *, size: tuple[int, int], channels: int) -> ImageSet:
    if channels not in (1, 3):
        raise DatasetError(f"{root}: images must have 1 or 3 channels, the model wants {channels}")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class folders; expected {root}/<class>/<image files>")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in SUFFIXES:
                images.append(_read(path, size=size, channels=channels))
                labels.append(label)
    if not images:
        raise DatasetError(f"{root}: no images ({', '.join(sorted(SUFFIXES))}) in the class folders")
    return ImageSet(np.stack(images).astype(np.uint8), np.array(labels, dtype=np.int64), tuple(classes), str(root))
