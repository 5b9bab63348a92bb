"""Image sets on disk, listed but not decoded: what fine-tuning streams from (pipeline/data/loader.py).

An `ImageIndex` lists a split's images (the files of an image folder, or the members of WebDataset-style tar
shards, pipeline/data/shards.py) with their labels, a few bytes per image; pixels are decoded only when an image
is read. Its fingerprint is a sha256 of the file list, sizes and modification times (`method` says which), so a
stage's cache key changes when a file does, without reading every pixel of a large set.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.data.image_folder import SUFFIXES, decode_bytes, read_image, report_changes
from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError

METHOD_FILES = "sha256 of the file list, sizes and mtimes"
METHOD_SHARDS = "sha256 of the shard list, sizes and mtimes"


@dataclass(frozen=True, eq=False)
class ImageIndex:
    """A split's images by location: `files[i]` is image i (a folder), or `member[i]` = (shard number, byte
    offset, byte size) of image i inside `files[shard]` (tar shards). Labels index `class_names`."""

    source: str
    class_names: tuple[str, ...]
    labels: np.ndarray
    files: tuple[str, ...]
    member: np.ndarray | None = None
    fingerprint: str = ""
    method: str = METHOD_FILES

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def kind(self) -> str:
        return "folder" if self.member is None else "tar shards"

    def take(self, idx: np.ndarray, part: str) -> ImageIndex:
        """The images at `idx` (a boolean mask or indices), named `source [part]`; same fingerprint: it is
        the whole set's, and the split is seeded."""
        idx = np.flatnonzero(idx) if idx.dtype == np.bool_ else np.asarray(idx, dtype=np.int64)
        if self.member is None:
            files = tuple(self.files[i] for i in idx)
            return replace(self, source=f"{self.source} [{part}]", labels=self.labels[idx], files=files)
        return replace(self, source=f"{self.source} [{part}]", labels=self.labels[idx], member=self.member[idx])

    def subset(self, n: int | None, *, seed: int = 0) -> ImageIndex:
        """The same images as ImageSet.subset would pick: the first `n` of a seeded permutation."""
        if n is None or n >= len(self):
            return self
        idx = np.random.default_rng(seed).permutation(len(self))[:n]
        return self.take(idx, f"subset {n}, seed {seed}")

    def relabel(self, mapping: np.ndarray, class_names: tuple[str, ...]) -> ImageIndex:
        return replace(self, labels=mapping[self.labels], class_names=class_names)

    def where(self, i: int) -> str:
        """Image i, as an error message names it."""
        if self.member is None:
            return self.files[i]
        shard, offset, _ = (int(v) for v in self.member[i])
        return f"{self.files[shard]} (member at byte {offset})"


class Reader:
    """Reads images of an index, keeping one open file per shard and process (each DataLoader worker has
    its own: descriptors are opened after the fork, reads use pread, no shared file position)."""

    def __init__(self, index: ImageIndex, *, size: tuple[int, int], channels: int) -> None:
        self.index, self.size, self.channels = index, size, channels
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def read(self, i: int) -> tuple[np.ndarray, bool, str | None]:
        """Image i as HxWxC uint8 at the model's size, whether it was resized, what it was converted from."""
        ix = self.index
        if ix.member is None:
            return read_image(Path(ix.files[i]), size=self.size, channels=self.channels)
        shard, offset, nbytes = (int(v) for v in ix.member[i])
        try:
            data = os.pread(self._fd(shard), nbytes, offset)
        except OSError as exc:
            raise DatasetError(f"{ix.where(i)}: cannot read it ({exc.strerror or exc})") from None
        if len(data) != nbytes:
            raise DatasetError(f"{ix.where(i)}: the shard is shorter than its index says; was it rewritten?")
        return decode_bytes(data, ix.where(i), size=self.size, channels=self.channels)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            try:
                self._fds[shard] = os.open(self.index.files[shard], os.O_RDONLY)
            except OSError as exc:
                raise DatasetError(f"{self.index.files[shard]}: cannot open this shard ({exc.strerror})") from None
        return self._fds[shard]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def load_index(index: ImageIndex, *, size: tuple[int, int], channels: int) -> ImageSet:
    """Decode every image of `index` into memory (for the small splits: validation, test, calibration),
    saying how many were resized or converted to the model's input."""
    if len(index) == 0:
        raise DatasetError(f"{index.source}: no images")
    reader = Reader(index, size=size, channels=channels)
    images = np.empty((len(index), size[0], size[1], channels), dtype=np.uint8)
    resized, converted = 0, Counter()
    try:
        for i in range(len(index)):
            images[i], was_resized, was = reader.read(i)
            resized += was_resized
            if was:
                converted[was] += 1
    finally:
        reader.close()
    report_changes(index.source, len(index), resized, converted, size=size, channels=channels)
    return ImageSet(images, index.labels.astype(np.int64), index.class_names, index.source)


def scan_folder(root: Path) -> ImageIndex:
    """`root/<class>/<image>` listed (classes sorted, label = position), nothing decoded."""
    if not root.is_dir():
        raise DatasetError(f"{root}: no such image folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class folders; expected {root}/<class>/<image files>")
    files, labels, digest = [], [], hashlib.sha256()
    for label, name in enumerate(classes):
        with os.scandir(root / name) as entries:
            found = sorted((e for e in entries if Path(e.name).suffix.lower() in SUFFIXES), key=lambda e: e.name)
        for e in found:
            st = e.stat()
            files.append(e.path)
            labels.append(label)
            digest.update(f"{name}/{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if not files:
        raise DatasetError(f"{root}: no images ({', '.join(sorted(SUFFIXES))}) in the class folders")
    return ImageIndex(str(root), tuple(classes), np.array(labels, dtype=np.int64), tuple(files),
                      fingerprint=digest.hexdigest(), method=METHOD_FILES)  # fmt: skip
