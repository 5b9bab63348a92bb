"""In-memory data for the Python API: a torch Dataset (or an ImageSet) as the pipeline's ImageSet.

An item is (image, label), or a bare image where labels are not needed (calibration). An image may be a uint8
HWC numpy array, a PIL image, or a CHW/HWC tensor or array of 0-1 floats or 0-255 integers; a 2-D image is one
channel. Layout is read from the model's input shape (CHW or HWC, whichever matches; else a tensor is taken as
CHW and an array as HWC, so that the shape error names what was given). The set's name carries the sha256 of
its pixels and labels, so a stage's cache key changes when the data does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.data.sources import fingerprint
from pipeline.errors import DatasetError
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)


def is_dataset(obj: Any) -> bool:
    """Whether `obj` is something to read items from (a Dataset, a list of pairs, an ImageSet)."""
    return (
        isinstance(obj, ImageSet)
        or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__"))
        or (hasattr(obj, "__iter__") and not isinstance(obj, str | bytes | dict))
    )


def dataset_classes(data: Any) -> tuple[str, ...] | None:
    """The class names a set carries: an ImageSet's, or a Dataset's `.classes` (torchvision), also under a
    torch Subset (`.dataset.classes`); None when it names none."""
    if isinstance(data, ImageSet):
        return data.class_names
    for holder in (data, getattr(data, "dataset", None)):
        names = getattr(holder, "classes", None)
        if isinstance(names, Sequence) and not isinstance(names, str) and names:
            return tuple(str(n) for n in names)
    return None


def to_imageset(data: Any, spec: ModelSpec, *, split: str, labelled: bool = True) -> ImageSet:
    """`data` as uint8 NHWC images with labels that index `spec.class_names`; DatasetError naming the item
    when an image or label is unusable, and ModelSpec.check_images' error when the shape is not the model's."""
    what = f"{type(data).__name__} ({split})"
    if isinstance(data, ImageSet):
        out = _from_imageset(data, spec, what, labelled=labelled)
        what = f"{data.source} ({split})"
    else:
        images, labels = _read_items(_items(data, what), spec, what, labelled=labelled)
        out = ImageSet(images, labels, spec.class_names, what)
    name = f"{what}, {len(out)} images, sha256 {fingerprint(out)[:16]}"
    out = ImageSet(out.images, out.labels, spec.class_names, name)
    spec.check_images(out)
    return out


def _from_imageset(data: ImageSet, spec: ModelSpec, what: str, *, labelled: bool) -> ImageSet:
    if labelled and data.labels is None:
        raise DatasetError(f"{data.source}: the {what} images need labels")
    if labelled and data.class_names != spec.class_names:
        raise DatasetError(
            f"{data.source}: its classes ({', '.join(data.class_names[:5])}, ...) are not the model's "
            f"({', '.join(spec.class_names[:5])}, ...); give classes= in the set's order or relabel it"
        )
    return ImageSet(data.images, data.labels if labelled else None, spec.class_names, data.source)


def _items(data: Any, what: str) -> Iterable[Any]:
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return (data[i] for i in range(len(data)))
    if hasattr(data, "__iter__"):
        return iter(data)
    raise DatasetError(f"{what}: a {type(data).__name__} is not a dataset; give a torch Dataset of (image, label)")


def _read_items(items: Iterable[Any], spec: ModelSpec, what: str, *, labelled: bool):
    images, labels, converted = [], [], 0
    for i, item in enumerate(items):
        pair = isinstance(item, tuple | list) and len(item) >= 2
        if labelled and not pair:
            raise DatasetError(f"{what}: item {i} is a {type(item).__name__}; each item must be (image, label)")
        img, was = _pixels(item[0] if isinstance(item, tuple | list) else item, spec, f"{what}: item {i}")
        converted += was
        if images and img.shape != images[0].shape:
            raise DatasetError(
                f"{what}: item {i} is {img.shape} (HWC), item 0 is {images[0].shape}; every image must have the "
                f"same size, the model's {_hwc(spec)}"
            )
        images.append(img)
        if labelled:
            labels.append(_label(item[1], len(spec.class_names), f"{what}: item {i}"))
    if not images:
        raise DatasetError(f"{what}: no images")
    if converted:
        log.warning("%s: %d of %d PIL images converted to %s", what, converted, len(images),
                    "grayscale" if spec.input_shape[0] == 1 else "RGB")  # fmt: skip
    return np.stack(images), (np.array(labels, dtype=np.int64) if labelled else None)


def _hwc(spec: ModelSpec) -> tuple[int, int, int]:
    c, h, w = spec.input_shape
    return h, w, c


def _pixels(img: Any, spec: ModelSpec, where: str) -> tuple[np.ndarray, bool]:
    """One image as uint8 HWC, and whether a PIL image had to change mode."""
    chw_first, converted = False, False
    if hasattr(img, "detach") and hasattr(img, "cpu"):  # a torch tensor
        arr, chw_first = img.detach().cpu().numpy(), True
    elif hasattr(img, "mode") and hasattr(img, "convert"):  # a PIL image
        want = "L" if spec.input_shape[0] == 1 else "RGB"
        if img.mode not in ("L", "RGB"):
            img, converted = img.convert(want), True
        arr = np.asarray(img)
    elif isinstance(img, np.ndarray):
        arr = img
    else:
        raise DatasetError(f"{where}: an image of type {type(img).__name__}; give numpy arrays, PIL images or tensors")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DatasetError(
            f"{where}: an image of shape {arr.shape}; give one image per item, HxWxC (numpy, PIL) or CxHxW (tensor)"
        )
    c, h, w = spec.input_shape
    if arr.shape == (c, h, w) and (arr.shape != (h, w, c) or chw_first):
        arr = arr.transpose(1, 2, 0)
    elif arr.shape != (h, w, c) and chw_first and arr.shape[0] <= 4 < arr.shape[2]:
        arr = arr.transpose(1, 2, 0)  # a CHW tensor of another size: say its HWC shape in the error
    return _to_uint8(arr, where), converted


def _to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise DatasetError(f"{where}: pixels of type {arr.dtype}; give 0-1 floats or 0-255 integers")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if np.issubdtype(arr.dtype, np.floating):
        if lo < 0 or hi > 1:
            raise DatasetError(
                f"{where}: float pixels from {lo:.3g} to {hi:.3g}; give 0-1 floats or uint8 0-255 pixels, not "
                "normalized ones (no Normalize transform: edgeship normalizes with mean and std itself)"
            )
        return np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    if lo < 0 or hi > 255:
        raise DatasetError(f"{where}: integer pixels from {lo:g} to {hi:g}; give 0-255 values (or 0-1 floats)")
    return arr.astype(np.uint8)


def _label(value: Any, n: int, where: str) -> int:
    if hasattr(value, "numel") or isinstance(value, np.ndarray):  # a tensor or array holding one label
        size = value.numel() if hasattr(value, "numel") else value.size
        value = value.item() if size == 1 else value
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DatasetError(f"{where}: label {value!r} is not a class index; each item must be (image, int label)")
    if not 0 <= int(value) < n:
        raise DatasetError(f"{where}: label {int(value)} is not one of the model's {n} classes (0..{n - 1})")
    return int(value)
