"""Which images a deploy trains, evaluates and calibrates on, chosen from the model and the options.

A split on disk (an image folder, or WebDataset-style tar shards: pipeline/data/shards.py) is listed, not
decoded (pipeline/data/stream.py): fine-tuning streams the training images through a DataLoader
(`train_stream`), and only the small splits (validation, test, calibration) are decoded into memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.data.imageset import ImageSet
from pipeline.data.stream import ImageIndex, load_index, scan_folder
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
    _sources: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # split -> its source

    def describe(self) -> dict[str, str]:
        """Each split's name; a folder's or shards' carries its fingerprint (file list, sizes, mtimes), an
        in-memory set's the sha256 of its pixels: a stage's cache key changes when the data does."""
        train = self._name("train")
        carved = f"{train}: {self.val_fraction:g} of each class (at most {self.val_max} images), seed {self.val_seed}"
        return {
            "train": train if self.val_set is not None else f"{train} minus the validation split",
            "val": self.val_set.source if self.val_set is not None else carved,
            "test": self._name("test"),
            "calibration": self._calibration_name(),
        }

    def fingerprints(self) -> dict[str, dict[str, object]]:
        """How the train and test splits were fingerprinted: {split: {images, kind, method, sha256}}."""
        out: dict[str, dict[str, object]] = {}
        for split in ("train", "test"):
            src = self._source(split)
            if isinstance(src, ImageIndex):
                out[split] = {"images": len(src), "kind": src.kind, "method": src.method, "sha256": src.fingerprint}
            elif self._given(split) is not None:
                out[split] = {"images": len(src), "kind": "in memory", "method": "sha256 of the pixels and labels",
                              "sha256": fingerprint(src)}  # fmt: skip
            else:
                out[split] = {"images": len(src), "kind": "built-in", "method": "the installed package", "sha256": None}
        return out

    def _given(self, split: str) -> ImageSet | None:
        return {"train": self.train_set, "test": self.test_set}[split]

    def _name(self, split: str) -> str:
        if (given := self._given(split)) is not None:
            return given.source
        if self.data_dir is None:
            c, h, w = self.spec.input_shape
            return f"fashion-mnist:{split}" + ("" if (c, h, w) == (1, 28, 28) else f" resized to {c}x{h}x{w}")
        src = self._source(split)
        assert isinstance(src, ImageIndex)
        return f"{src.source} ({len(src)} images, {src.kind}; {src.method}: {src.fingerprint[:16]})"

    def _calibration_name(self) -> str:
        if self.calibration_set is not None:
            return self.calibration_set.source
        path = self.calibration_file
        if path.is_dir():
            idx = scan_folder(path)
            return f"{path} ({len(idx)} images; {idx.method}: {idx.fingerprint[:16]})"
        return str(path)

    @property
    def calibration_file(self) -> Path:
        if self.calibration_path is not None:
            return self.calibration_path
        if self.data_dir is None:
            return FMNIST_CALIBRATION
        return self.data_dir / "calibration"

    def check(self) -> None:
        """DatasetError naming what is missing, before any stage runs: a train or test split that is neither
        an image folder nor tar shards, or no calibration images."""
        for split in ("train", "test"):
            if self._given(split) is None and self.data_dir is not None:
                self._source(split)
        path = self.calibration_file
        if self.calibration_set is None and not path.exists():
            given = self.calibration_path is not None
            fix = (
                "give an existing .npz or image folder"
                if given
                else (f"add {path}/<class>/<images> (a few hundred training images) or give --calibration FILE.npz|DIR")
            )
            raise DatasetError(
                f"{path}: no such calibration {'file or folder' if given else 'split'}; int8 calibration and the "
                f"export check read calibration images: {fix}"
            )  # fmt: skip

    def _source(self, split: str) -> ImageSet | ImageIndex:
        """The split as given (in memory), the built-in set, or an index of the folder or shards on disk."""
        if (given := self._given(split)) is not None:
            return given
        if split not in self._sources:
            self._sources[split] = self._find(split)
        return self._sources[split]

    def _find(self, split: str) -> ImageSet | ImageIndex:
        if self.data_dir is None:
            from pipeline.data.fashion_mnist import fashion_mnist_for, load_fashion_mnist

            if self.spec.input_shape == (1, 28, 28):
                return load_fashion_mnist(split)  # type: ignore[arg-type]
            if not self._resizable_fashion_mnist():
                raise DatasetError(
                    f"model {self.spec.name} takes {self.spec.input_shape} inputs and has no built-in dataset; "
                    f"give --data DIR with DIR/train/<class>/*.png and DIR/test/<class>/*.png"
                )
            return fashion_mnist_for(self.spec, split)  # named "... resized to CxHxW"
        from pipeline.data.shards import find_shards, scan_shards, shard_classes

        folder = self.data_dir / split
        shards = find_shards(self.data_dir, split)
        if shards and not (folder.is_dir() and any(p.is_dir() for p in folder.iterdir())):
            names = shard_classes(self.data_dir, split) or self.spec.class_names
            where = folder if folder.is_dir() else self.data_dir / f"{split}-*.tar"
            return self._to_model_classes(scan_shards(shards, class_names=names, source=str(where)))
        if not folder.is_dir():
            raise DatasetError(
                f"{folder}: no such folder; --data DIR needs DIR/{split}/<class>/<images> (or tar shards: "
                f"DIR/{split}/*.tar or DIR/{split}-*.tar holding <key>.png + <key>.cls)"
            )
        return self._to_model_classes(scan_folder(folder))

    def _resizable_fashion_mnist(self) -> bool:
        """A Fashion-MNIST classifier at another input size (the 3x64x64 bench models): the built-in set is
        resized (bilinear) and its channel replicated to the model's input, as `make baseline` trained it."""
        from pipeline.data.fashion_mnist import CLASS_NAMES

        return tuple(self.spec.class_names) == CLASS_NAMES and self.spec.input_shape[0] in (1, 3)

    def _decode(self, data: ImageSet | ImageIndex) -> ImageSet:
        if isinstance(data, ImageSet):
            return data
        c, h, w = self.spec.input_shape
        return load_index(data, size=(h, w), channels=c)

    def _to_model_classes(self, data: ImageIndex) -> ImageIndex:
        """Folder labels (0..K-1 in sorted folder order) -> the model's class indices, matched by name.

        A folder set that names a subset of the model's classes (e.g. `imagenet_285/` for a 1000-class model)
        is relabelled; folders that are not the model's classes are an error rather than silently wrong."""
        names = self.spec.class_names
        if data.class_names == names:
            return data
        index = {n: i for i, n in enumerate(names)}
        unknown = [n for n in data.class_names if n not in index]
        if unknown:
            raise DatasetError(
                f"{data.source}: class folders {unknown[:5]} are not classes of model {self.spec.name} "
                f"({len(names)} classes: {', '.join(names[:3])}, ...); name each folder after a model class"
            )
        mapping = np.array([index[n] for n in data.class_names], dtype=np.int64)
        return data.relabel(mapping, names)

    @cached_property
    def _split(self) -> tuple[ImageSet | ImageIndex, ImageSet]:
        data = self._source("train")
        if isinstance(data, ImageSet):
            self.spec.check_images(data)
        if self.val_set is not None:
            self.spec.check_images(self.val_set)
            return data, self.val_set
        train, val = split_validation(data, fraction=self.val_fraction, max_images=self.val_max, seed=self.val_seed)
        return train, self._decode(val)

    @property
    def train_stream(self) -> ImageSet | ImageIndex:
        """The training images less the validation split, for streaming (pipeline/data/loader.py): an index of
        the files or shards (nothing decoded), or the in-memory set."""
        return self._split[0]

    @cached_property
    def train(self) -> ImageSet:
        """The training images less the validation split, all decoded into memory (prefer `train_stream`, or
        `train_sample` for a few hundred of them)."""
        return self._decode(self._split[0])

    def train_sample(self, n: int | None, *, seed: int = 0) -> ImageSet:
        """The images `train.subset(n, seed=seed)` holds, decoding only those."""
        return self._decode(self._split[0].subset(n, seed=seed))

    @property
    def val(self) -> ImageSet:
        """The validation split carved from train (seeded, stratified): what every decision reads."""
        return self._split[1]

    @cached_property
    def test(self) -> ImageSet:
        data = self._decode(self._source("test").subset(self.test_limit, seed=1))
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
            if path == FMNIST_CALIBRATION and self.spec.input_shape != (1, 28, 28) and self._resizable_fashion_mnist():
                from pipeline.data.fashion_mnist import fit_images

                c, h, w = self.spec.input_shape
                data = ImageSet(fit_images(data.images, self.spec.input_shape), data.labels, data.class_names,
                                f"{data.source} resized to {c}x{h}x{w}")  # fmt: skip
        self.spec.check_images(data)
        return data


def split_validation(data: ImageSet | ImageIndex, *, fraction: float, max_images: int, seed: int
                     ) -> tuple[ImageSet | ImageIndex, ImageSet | ImageIndex]:  # fmt: skip
    """(train, val): `fraction` of each class (at least one image of a class with two or more) held out, at
    most `max_images` in all, chosen by a seeded shuffle; unlabelled images are split without strata. An
    ImageIndex is split by its labels, nothing decoded."""
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


def _take(data: ImageSet | ImageIndex, mask: np.ndarray, part: str) -> ImageSet | ImageIndex:
    if isinstance(data, ImageIndex):
        return data.take(mask, f"{part}: {int(mask.sum())}")
    labels = None if data.labels is None else data.labels[mask]
    return ImageSet(data.images[mask], labels, data.class_names, f"{data.source} [{part}: {int(mask.sum())}]")


def fingerprint(data: ImageSet) -> str:
    """sha256 of the pixels and labels: a stage's cache key changes when its data does."""
    h = hashlib.sha256(data.images.tobytes())
    if data.labels is not None:
        h.update(data.labels.astype("int64").tobytes())
    return h.hexdigest()
