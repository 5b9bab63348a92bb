"""Which images a deploy trains, evaluates and calibrates on, chosen from the model and the options."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError
from pipeline.models.spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent.parent
FMNIST_CALIBRATION = REPO / "calibration_data" / "fashion_mnist_train_500.npz"


@dataclass(frozen=True)
class DataPlan:
    """Where each split comes from. Loaded lazily: a skipped stage never reads its data.

    The `*_set` fields are splits already in memory (the Python API's Datasets, pipeline/data/dataset.py),
    labelled with the model's classes and named with their fingerprint; each one given replaces its source."""

    spec: ModelSpec
    data_dir: Path | None = None
    calibration_path: Path | None = None
    test_limit: int | None = None
    val_fraction: float = 0.1  # of train, per class, held out for every decision (never trained on)
    val_max: int = 5000
    val_seed: int = 0
    train_set: ImageSet | None = field(default=None, repr=False, compare=False)
    val_set: ImageSet | None = field(default=None, repr=False, compare=False)
    test_set: ImageSet | None = field(default=None, repr=False, compare=False)
    calibration_set: ImageSet | None = field(default=None, repr=False, compare=False)

    def describe(self) -> dict[str, str]:
        train = self._name("train")
        carved = f"{train}: {self.val_fraction:g} of each class (at most {self.val_max} images), seed {self.val_seed}"
        return {
            "train": train if self.val_set is not None else f"{train} minus the validation split",
            "val": self.val_set.source if self.val_set is not None else carved,
            "test": self._name("test"),
            "calibration": str(self.calibration_file) if self.calibration_set is None else self.calibration_set.source,
        }

    def _given(self, split: str) -> ImageSet | None:
        return {"train": self.train_set, "test": self.test_set}[split]

    def _name(self, split: str) -> str:
        if (given := self._given(split)) is not None:
            return given.source
        return str(self.data_dir / split) if self.data_dir else f"fashion-mnist:{split}"

    @property
    def calibration_file(self) -> Path:
        if self.calibration_path is not None:
            return self.calibration_path
        if self.data_dir is None:
            return FMNIST_CALIBRATION
        return self.data_dir / "calibration"

    def _load(self, split: str) -> ImageSet:
        if (given := self._given(split)) is not None:
            return given
        if self.data_dir is None:
            if self.spec.input_shape != (1, 28, 28):
                raise DatasetError(
                    f"model {self.spec.name} takes {self.spec.input_shape} inputs and has no built-in dataset; "
                    f"give --data DIR with DIR/train/<class>/*.png and DIR/test/<class>/*.png"
                )
            from pipeline.data.fashion_mnist import load_fashion_mnist

            return load_fashion_mnist(split)  # type: ignore[arg-type]
        from pipeline.data.image_folder import load_image_folder

        c, h, w = self.spec.input_shape
        folder = self.data_dir / split
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such folder; --data DIR needs DIR/{split}/<class>/<images>")
        return self._to_model_classes(load_image_folder(folder, size=(h, w), channels=c))

    def _to_model_classes(self, data: ImageSet) -> ImageSet:
        """Folder labels (0..K-1 in sorted folder order) -> the model's class indices, matched by name.

        A folder set that names a subset of the model's classes (e.g. `imagenet_285/` for a 1000-class model)
        is relabelled; folders that are not the model's classes are an error rather than silently wrong."""
        names = self.spec.class_names
        if data.class_names == names or data.labels is None:
            return data
        index = {n: i for i, n in enumerate(names)}
        unknown = [n for n in data.class_names if n not in index]
        if unknown:
            raise DatasetError(
                f"{data.source}: class folders {unknown[:5]} are not classes of model {self.spec.name} "
                f"({len(names)} classes: {', '.join(names[:3])}, ...); name each folder after a model class"
            )
        mapping = np.array([index[n] for n in data.class_names], dtype=np.int64)
        return ImageSet(data.images, mapping[data.labels], names, data.source)

    @cached_property
    def _split(self) -> tuple[ImageSet, ImageSet]:
        data = self._load("train")
        self.spec.check_images(data)
        if self.val_set is not None:
            self.spec.check_images(self.val_set)
            return data, self.val_set
        return split_validation(data, fraction=self.val_fraction, max_images=self.val_max, seed=self.val_seed)

    @property
    def train(self) -> ImageSet:
        """The training images less the validation split: what fine-tuning learns from."""
        return self._split[0]

    @property
    def val(self) -> ImageSet:
        """The validation split carved from train (seeded, stratified): what every decision reads."""
        return self._split[1]

    @cached_property
    def test(self) -> ImageSet:
        data = self._load("test").subset(self.test_limit, seed=1)
        self.spec.check_images(data)
        if data.labels is None:
            raise DatasetError(f"{data.source}: the test split needs labels (one folder per class)")
        return data

    @cached_property
    def calibration(self) -> ImageSet:
        path = self.calibration_file
        if self.calibration_set is not None:
            data = self.calibration_set
        elif path.is_dir():
            from pipeline.data.image_folder import load_image_folder

            c, h, w = self.spec.input_shape
            data = load_image_folder(path, size=(h, w), channels=c)
        else:
            from pipeline.data.calibration import load_calibration

            data = load_calibration(path)
        self.spec.check_images(data)
        return data


def split_validation(data: ImageSet, *, fraction: float, max_images: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, val): `fraction` of each class (at least one image of a class with two or more) held out, at
    most `max_images` in all, chosen by a seeded shuffle; unlabelled images are split without strata."""
    if not 0 < fraction < 1:
        raise DatasetError(f"validation fraction must be between 0 and 1, got {fraction}")
    n = len(data)
    want = min(max_images, max(1, round(fraction * n)))
    rng = np.random.default_rng(seed)
    if data.labels is None:
        val_idx = rng.permutation(n)[:want]
    else:
        picked = []
        for c in np.unique(data.labels):
            members = rng.permutation(np.flatnonzero(data.labels == c))
            k = round(len(members) * want / n)
            picked.append(members[: max(k, 1) if len(members) > 1 else 0])
        val_idx = np.concatenate(picked) if picked else np.array([], dtype=np.int64)
    if len(val_idx) == 0 or len(val_idx) >= n:
        raise DatasetError(f"{data.source}: {n} training images are too few to hold out a validation split")
    mask = np.zeros(n, dtype=bool)
    mask[val_idx] = True
    return _take(data, ~mask, "train"), _take(data, mask, "val")


def _take(data: ImageSet, mask: np.ndarray, part: str) -> ImageSet:
    labels = None if data.labels is None else data.labels[mask]
    return ImageSet(data.images[mask], labels, data.class_names, f"{data.source} [{part}: {int(mask.sum())}]")


def fingerprint(data: ImageSet) -> str:
    """sha256 of the pixels and labels: a stage's cache key changes when its data does."""
    h = hashlib.sha256(data.images.tobytes())
    if data.labels is not None:
        h.update(data.labels.astype("int64").tobytes())
    return h.hexdigest()
