"""In-memory image sets: the one record every data source produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """Raw images as uint8 NHWC (0-255), optional int64 labels, class names, and where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"ImageSet wants uint8 NHWC images, got {self.images.dtype} {self.images.shape}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError("ImageSet: labels and images differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None, *, seed: int = 0) -> ImageSet:
        """The first `n` images of a seeded shuffle (all of them when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = np.random.default_rng(seed).permutation(len(self))[:n]
        labels = None if self.labels is None else self.labels[idx]
        return ImageSet(self.images[idx], labels, self.class_names, f"{self.source} (subset {n}, seed {seed})")
