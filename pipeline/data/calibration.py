"""Calibration sets for int8: an .npz with `images` (uint8 N,H,W[,C]), optional `labels` and `class_names`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError


def load_calibration(path: Path) -> ImageSet:
    if not path.is_file():
        raise DatasetError(f"{path}: no such calibration file; give --calibration FILE.npz or an image folder")
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = npz["images"]
            labels = npz["labels"].astype(np.int64) if "labels" in npz.files else None
            names = tuple(str(n) for n in npz["class_names"]) if "class_names" in npz.files else ()
    except KeyError:
        raise DatasetError(f"{path}: the .npz has no 'images' array") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz calibration set ({exc})") from None
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: calibration images must be uint8 pixels 0-255, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or len(images) == 0:
        raise DatasetError(f"{path}: expected a non-empty N,H,W[,C] image array, got shape {images.shape}")
    return ImageSet(images, labels, names, f"calibration:{path.name}")
