"""Training images through torch.utils.data: decoded, resized and augmented in DataLoader worker processes.

`StreamDataset` reads one image at a time from an ImageIndex (a folder or tar shards, decoded from disk) or an
in-memory ImageSet (the built-in sets, the Python API's Datasets); memory stays flat in the set's size. A batch
is (uint8 NCHW tensor, labels or -1, resized flags): normalisation happens on the training device. Augmentation
(a random shift of up to `shift` pixels, edges replicated) is drawn per image from a hash of
(seed, epoch, image index), so it is the same whichever worker, rank or world size reads the image.
`DistributedSampler` shards each epoch's seeded permutation across ranks: at world size W the images of a
global step are those a single process with the same global batch would take (interleaved over ranks).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pipeline.data.imageset import ImageSet
from pipeline.data.stream import ImageIndex, Reader


def shift_of(seed: int, epoch: int, i: int, shift: int) -> tuple[int, int]:
    """The (dy, dx) of image i's shift in `epoch`, each in 0..2*shift: a hash of (seed, epoch, i), so the same
    whichever worker or rank reads it (splitmix64, a few integer operations per image)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + i * 0x94D049BB133111EB + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    span = 2 * shift + 1
    return int(z % span), int((z >> 32) % span)


def shift_image(img: np.ndarray, dy: int, dx: int, shift: int) -> np.ndarray:
    """`img` (HxWxC) moved by (dy - shift, dx - shift) pixels, edges replicated (label-preserving)."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((shift, shift), (shift, shift), (0, 0)), mode="edge")
    return padded[dy : dy + h, dx : dx + w]


def collated(batch):
    """The DataLoader's collate_fn: StreamDataset.__getitems__ already returns the batch."""
    return batch


class StreamDataset(Dataset):
    """Batches (uint8 NCHW tensor, int64 labels or -1, resized flags) of an ImageIndex or ImageSet, read by
    `__getitems__` (one call per batch); a key is an index or (epoch, index) (see EpochSampler), which seeds
    that image's augmentation."""

    def __init__(self, source: ImageIndex | ImageSet, *, size: tuple[int, int], channels: int, seed: int = 0,
                 shift: int = 0) -> None:  # fmt: skip
        self.source, self.seed, self.shift = source, seed, shift
        self.reader = Reader(source, size=size, channels=channels) if isinstance(source, ImageIndex) else None
        self.labels = source.labels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        x, y, r = self.__getitems__([key])
        return x[0], int(y[0]), int(r[0])

    def __getitems__(self, keys: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = [k if isinstance(k, tuple) else (0, k) for k in keys]
        idx = np.array([int(i) for _, i in pairs], dtype=np.int64)
        if self.reader is not None:
            read = [self.reader.read(int(i)) for i in idx]
            images = np.stack([img for img, _, _ in read])
            resized = np.array([r for _, r, _ in read], dtype=np.int64)
        else:
            images, resized = self.source.images[idx], np.zeros(len(idx), dtype=np.int64)
        if self.shift:
            images = np.stack([shift_image(img, *shift_of(self.seed, int(e), int(i), self.shift), self.shift)
                               for img, (e, i) in zip(images, pairs, strict=True)])  # fmt: skip
        labels = np.full(len(idx), -1, dtype=np.int64) if self.labels is None else self.labels[idx].astype(np.int64)
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return x, torch.from_numpy(labels), torch.from_numpy(resized)


class EpochSampler(Sampler):
    """A DistributedSampler whose keys carry the epoch: (epoch, index)."""

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner, self.epoch = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, int(i)) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


@dataclass(frozen=True)
class Loader:
    """A DataLoader over one rank's share of the set, and the sampler to set each epoch on."""

    loader: DataLoader
    sampler: EpochSampler
    labelled: bool
    workers: int


def default_workers(source: ImageIndex | ImageSet, *, world_size: int, on_gpu: bool) -> int:
    """Decoding workers per rank: files are decoded in parallel (up to 8 per rank, the CPUs shared among the
    ranks of this machine); in-memory images need no decoding, only a helper for the shifts on GPU."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(source, ImageSet):
        return 2 if on_gpu else 0
    return max(1, min(8, cpus // max(1, world_size)))


def make_loader(source: ImageIndex | ImageSet, *, size: tuple[int, int], channels: int, batch_size: int,
                seed: int, rank: int = 0, world_size: int = 1, workers: int | None = None, pin_memory: bool = False,
                shift: int = 2) -> Loader:  # fmt: skip
    """A loader of `batch_size` images per rank (the global batch is batch_size * world_size), shuffled by a
    seeded permutation per epoch (DistributedSampler, shared by the ranks); the last batch may be smaller."""
    ds = StreamDataset(source, size=size, channels=channels, seed=seed, shift=shift)
    inner = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False)
    sampler = EpochSampler(inner)
    n = default_workers(source, world_size=world_size, on_gpu=pin_memory) if workers is None else workers
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=n, pin_memory=pin_memory,
                        collate_fn=collated, persistent_workers=n > 0, prefetch_factor=2 if n else None)  # fmt: skip
    return Loader(loader, sampler, source.labels is not None, n)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *, device: torch.device,
              channels_last: bool = False) -> torch.Tensor:  # fmt: skip
    """uint8 NCHW (any device) -> normalised float32 NCHW on `device`, as ModelSpec.to_tensor computes it."""
    x = x.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
