"""Calibration images trimmed of activation outliers: percentile-like ranges from a min/max calibrator.

onnx2tf (and TensorFlow's converter behind it) sets each int8 tensor's range to the min/max over the
calibration images, and has no percentile or KL option. One image with an extreme activation widens that
tensor's range, and so coarsens its int8 steps, for every image. Here the float model runs on the candidate
images with a hook on every module; for each tensor, an image's extreme is its largest |activation|. Images
are dropped, the most extreme first (score: the image's largest extreme relative to that tensor's
(1 - `fraction`) quantile of extremes), until no image exceeds its tensors' quantiles or `max_share` of the
images are gone. The converter's min/max over what is left is then about the (1 - fraction) quantile of the
per-image extremes instead of their maximum: percentile calibration with the converter's own calibrator.
Whether it helps is measured like every remedy (top-1 agreement on the validation split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.models.hooks import run_hooked

BATCH = 64


@dataclass(frozen=True)
class Trimmed:
    keep: np.ndarray  # indices of the images kept, ascending
    dropped: int


def per_image_extremes(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """[images, tensors]: each image's largest |activation| in each module output (leaf or not)."""
    cols: list[list[np.ndarray]] = []
    mods = [m for m in model.modules() if m is not model]
    for start in range(0, len(x), BATCH):
        seen: list[np.ndarray] = []

        def hook(_m: nn.Module, _i: object, out: object, seen: list[np.ndarray] = seen) -> None:
            if isinstance(out, torch.Tensor) and out.dim() >= 1 and out.is_floating_point():
                seen.append(out.detach().abs().flatten(1).amax(1).float().numpy() if out.dim() > 1
                            else out.detach().abs().float().numpy())  # fmt: skip

        run_hooked(model, x[start : start + BATCH], [m.register_forward_hook(hook) for m in mods])
        cols.append(seen)
    width = min((len(c) for c in cols), default=0)  # modules called a varying number of times: what all have
    if width == 0:  # no submodule gave a tensor (or no images): nothing to rank the images by
        return np.zeros((len(x), 0), dtype=np.float32)
    return np.stack([np.concatenate([c[t] for c in cols]) for t in range(width)], axis=1)


def trim_outliers(model: nn.Module, x: torch.Tensor, *, fraction: float = 0.01, max_share: float = 0.2) -> Trimmed:
    """The images to calibrate on once the ones setting each tensor's extreme range are dropped (see above)."""
    ext = per_image_extremes(model, x)
    n = len(ext)
    if ext.shape[1] == 0 or n == 0:
        return Trimmed(np.arange(n), 0)
    q = np.quantile(ext, 1.0 - fraction, axis=0)
    score = (ext / np.maximum(q, 1e-12)).max(axis=1)  # > 1: beyond some tensor's quantile
    order = np.argsort(-score, kind="stable")
    limit = int(max_share * n)
    drop = [int(i) for i in order[:limit] if score[i] > 1.0]
    keep = np.setdiff1d(np.arange(n), np.asarray(drop, dtype=np.int64))
    return Trimmed(keep, len(drop))
