"""What the pipeline needs to know about a model besides its weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError


@dataclass(frozen=True)
class ModelSpec:
    """A model family: how to build it, the input it takes and how pixels are normalized.

    `input_shape` is (C, H, W) for batch 1; `mean`/`std` are per channel, in 0-1 pixel units
    (x = (pixel/255 - mean) / std).
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    default_checkpoint: str | None = None  # path relative to the repository root, or None
    # fine-tuning augmentation (pipeline/train/augment.py): "shift" (small shifts, safe for any image task) or
    # "rgb" (random resized crop, horizontal flip, colour jitter: photos, which a model opts into)
    augment: str = "shift"

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC images -> normalized float32 NCHW tensor."""
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 1, 1, -1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 1, 1, -1)
        return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()

    def batches(
        self, data: ImageSet, *, batch_size: int = 250, limit: int | None = None, seed: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """`data` (a seeded subset of `limit` images when given) as normalized (images, labels) batches."""
        data = data.subset(limit, seed=seed)
        out = []
        for i in range(0, len(data), batch_size):
            labels = None if data.labels is None else torch.from_numpy(data.labels[i : i + batch_size]).long()
            out.append((self.to_tensor(data.images[i : i + batch_size]), labels))
        return out

    def check_images(self, data: ImageSet) -> None:
        """Raise DatasetError when the images' HWC shape does not match the model input."""
        c, h, w = self.input_shape
        if data.images.shape[1:] != (h, w, c):
            raise DatasetError(
                f"{data.source}: images are {data.images.shape[1:]} (HWC), model {self.name} wants {(h, w, c)}; "
                "resize the images or pick the model that matches them"
            )
