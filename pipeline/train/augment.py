"""Fine-tuning augmentation, on normalized NCHW batches, seeded by the caller's generator.

`shift` (every model): random shifts of up to 2 pixels (replicate-pad and crop), label-preserving for any image
task, digits and clothes included. `rgb` (models whose spec opts in with `augment="rgb"`: photos): random
resized crop (scale 0.6-1, aspect 3/4-4/3), horizontal flip and colour jitter (brightness, contrast,
saturation by up to 20%), applied in pixel units and normalized back."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec

KINDS = ("shift", "rgb")


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def _crop_boxes(n: int, h: int, w: int, gen: torch.Generator) -> list[tuple[int, int, int, int]]:
    boxes = []
    for _ in range(n):
        area = float(torch.empty(1).uniform_(0.6, 1.0, generator=gen)) * h * w
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        ch, cw = min(h, round(math.sqrt(area / ratio))), min(w, round(math.sqrt(area * ratio)))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        boxes.append((y0, x0, ch, cw))
    return boxes


def rgb(x: torch.Tensor, spec: ModelSpec, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = x.shape
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    px = x * std + mean  # 0-1 pixel units
    boxes = _crop_boxes(n, h, w, gen)
    px = torch.cat([F.interpolate(px[i : i + 1, :, y0 : y0 + ch, x0 : x0 + cw], size=(h, w), mode="bilinear",
                                  align_corners=False) for i, (y0, x0, ch, cw) in enumerate(boxes)])  # fmt: skip
    flip = torch.rand(n, generator=gen) < 0.5
    px = torch.where(flip.view(-1, 1, 1, 1), px.flip(3), px)
    bright, contrast, sat = (1 + (torch.rand(3, n, generator=gen) * 0.4 - 0.2)).view(3, n, 1, 1, 1)
    px = px * bright
    px = (px - px.mean(dim=(1, 2, 3), keepdim=True)) * contrast + px.mean(dim=(1, 2, 3), keepdim=True)
    if c == 3:
        grey = px.mean(dim=1, keepdim=True)
        px = (px - grey) * sat + grey
    return (px.clamp(0, 1) - mean) / std


def augment(x: torch.Tensor, spec: ModelSpec, gen: torch.Generator) -> torch.Tensor:
    """The spec's augmentation of one training batch."""
    return rgb(x, spec, gen) if getattr(spec, "augment", "shift") == "rgb" else shift(x, gen)
