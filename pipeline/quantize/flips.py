"""Where int8 disagrees with PyTorch, how sure the float model was: flips confined to near-ties differ from
flips on confident images (the first is rounding noise at a decision boundary, the second a broken op)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def float_margins(logits: np.ndarray) -> np.ndarray:
    """The float model's top-1 minus top-2 softmax probability, per image."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p = np.sort(p / p.sum(axis=1, keepdims=True), axis=1)
    return p[:, -1] - p[:, -2]


def disagreements(top1: np.ndarray, ref_top1: np.ndarray, margin: np.ndarray) -> dict[str, Any]:
    """The images where `top1` (int8) differs from `ref_top1` (PyTorch): how many, the float model's largest
    and median margin on them, and how many of all the images have a margin at most that largest one."""
    bad = np.flatnonzero(np.asarray(top1) != np.asarray(ref_top1))
    if not len(bad):
        return {"images": 0, "max_float_margin": None, "median_float_margin": None, "images_within": 0}
    worst = float(margin[bad].max())
    return {"images": len(bad), "max_float_margin": round(worst, 6),
            "median_float_margin": round(float(np.median(margin[bad])), 6),
            "images_within": int(np.sum(margin <= worst))}  # fmt: skip


def flips_text(d: Mapping[str, Any], total: int) -> str:
    """One sentence on the disagreements (`disagreements`); '' when there are none or no record."""
    if not d or not d.get("images"):
        return ""
    n = d["images"]
    return (f"The {n} validation image{'s' if n != 1 else ''} where int8 disagrees with PyTorch "
            f"{'are' if n != 1 else 'is'} among the {d['images_within']} of {total} whose float top-1 and top-2 "
            f"probabilities are within {d['max_float_margin']:.3f} of each other "
            f"(median margin of the flips {d['median_float_margin']:.3f}).")  # fmt: skip
