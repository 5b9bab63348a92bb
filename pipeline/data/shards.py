"""WebDataset-style tar shards: sets too large for a folder tree, read in place.

A shard is a plain (uncompressed) tar file; each sample is `<key>.<png|jpg|jpeg|bmp>` with its label in
`<key>.cls` (the class index as text), the key being the member name up to the first dot of its file name.
A split is the `*.tar` files of `DIR/<split>/` or the files `DIR/<split>-*.tar` (also `<split>_*.tar`), in name
order. Class names come from `classes.txt` (one per line, in index order) beside the shards or in DIR, or from
the model (`--classes`). Indexing reads the tar headers and the small `.cls` members, never an image; reading an
image is one pread at its recorded offset (pipeline/data/stream.py), so shards are not unpacked.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np

from pipeline.data.image_folder import SUFFIXES
from pipeline.data.stream import METHOD_SHARDS, ImageIndex
from pipeline.errors import DatasetError

CLASSES_FILE = "classes.txt"


def find_shards(data_dir: Path, split: str) -> list[Path]:
    """The shards of `split` (empty when there are none): DIR/<split>/*.tar, else DIR/<split>-*.tar."""
    folder = data_dir / split
    if folder.is_dir():
        return sorted(p for p in folder.glob("*.tar") if p.is_file())
    return sorted(p for pat in (f"{split}-*.tar", f"{split}_*.tar") for p in data_dir.glob(pat) if p.is_file())


def shard_classes(data_dir: Path, split: str = "train") -> tuple[str, ...] | None:
    """The class names listed in classes.txt beside the split's shards (or in DIR), None when there is none."""
    for path in (data_dir / split / CLASSES_FILE, data_dir / CLASSES_FILE):
        if path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DatasetError(f"{path}: cannot read it ({exc}); give one class name per line, UTF-8") from None
            return tuple(line.strip() for line in text.splitlines() if line.strip())
    return None


def _split_name(name: str) -> tuple[str, str]:
    p = PurePosixPath(name)
    base, dot, ext = p.name.partition(".")
    return str(p.parent / base) if str(p.parent) != "." else base, (dot + ext).lower()


def _label(tar: tarfile.TarFile, m: tarfile.TarInfo, where: str, n_classes: int | None) -> int:
    fh = tar.extractfile(m)
    text = (fh.read(64) if fh is not None else b"").decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise DatasetError(f"{where}: {m.name} holds {text[:20]!r}, not a class index (an integer)") from None
    if label < 0 or (n_classes is not None and label >= n_classes):
        valid = f"0..{n_classes - 1}" if n_classes is not None else "0 or more"
        raise DatasetError(f"{where}: {m.name} says class {label}; valid class indices are {valid}")
    return label


def _scan_one(path: Path, n_classes: int | None) -> tuple[list[tuple[int, int]], list[int]]:
    """(byte offset, byte size) of each sample's image and its label, in member order."""
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                if ext == ".cls":
                    labels[key] = _label(tar, m, str(path), n_classes)
                elif ext in SUFFIXES:
                    images[key] = (m.offset_data, m.size)
    except (tarfile.ReadError, OSError, EOFError) as exc:
        raise DatasetError(
            f"{path}: not a readable plain tar shard ({exc}); shards must be uncompressed .tar files"
        ) from None
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DatasetError(f"{path}: sample {missing[0]!r} has an image but no {missing[0]}.cls label "
                           f"({len(missing)} such samples); every sample needs <key>.cls")  # fmt: skip
    return list(images.values()), [labels[key] for key in images]


def scan_shards(shards: list[Path], *, class_names: tuple[str, ...], source: str) -> ImageIndex:
    """Index the samples of `shards` (labels index `class_names`); DatasetError naming the shard and member
    when one is not a plain tar, a sample has no label or a label is out of range."""
    if not shards:
        raise DatasetError(f"{source}: no .tar shards")
    member, labels, digest = [], [], hashlib.sha256()
    for number, path in enumerate(shards):
        st = path.stat()
        digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        rows, shard_labels = _scan_one(path, len(class_names) or None)
        member += [(number, off, size) for off, size in rows]
        labels += shard_labels
    if not member:
        raise DatasetError(f"{source}: the shards hold no images ({', '.join(sorted(SUFFIXES))} with a .cls label)")
    return ImageIndex(source, class_names, np.array(labels, dtype=np.int64), tuple(str(p) for p in shards),
                      member=np.array(member, dtype=np.int64), fingerprint=digest.hexdigest(),
                      method=METHOD_SHARDS)  # fmt: skip


def write_shards(
    samples, out_dir: Path, *, prefix: str = "shard", per_shard: int = 1000, ext: str = "png"
) -> list[Path]:
    """Write (HxWxC or HxW uint8 image, int label) samples as `out_dir/<prefix>-NNNNNN.tar` shards of
    `per_shard` samples each (keys `%08d`); returns the shard paths. For building a sharded set from any images."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with contextlib.ExitStack() as stack:
        tar: tarfile.TarFile | None = None
        for i, (img, label) in enumerate(samples):
            if i % per_shard == 0:
                stack.close()
                paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
                tar = stack.enter_context(tarfile.open(paths[-1], mode="w"))
            arr = np.asarray(img)
            if arr.ndim == 3 and arr.shape[2] == 3:
                arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
            ok, enc = cv2.imencode(f".{ext}", arr)
            if not ok:
                raise DatasetError(f"sample {i}: cannot encode it as .{ext}")
            for name, data in ((f"{i:08d}.{ext}", enc.tobytes()), (f"{i:08d}.cls", str(int(label)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                assert tar is not None
                tar.addfile(info, io.BytesIO(data))
    return paths
