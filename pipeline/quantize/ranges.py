"""Activation ranges chosen for int8, not taken from TFLite's calibrator.

TFLite's calibrator gives every activation tensor the min and max it saw on the calibration images, with two
faults. One outlier image or one rare large value stretches the int8 step for all the others. And the min/max
it records for a tensor whose buffer an in-place op reuses is that op's output range: it logs an op's inputs
again after running it (tensorflow/tensorflow#127842). Measured here (TF 2.19, onnx2tf 1.29): a conv feeding
`x * 30` got the MUL's range, 30x the values it takes (the branch_concat bench model: plain int8 agreement
0.934, 0.980 with the true ranges); in the MobileNetV2-style model one input of every residual ADD got the
ADD's output range (1.3x-2.6x wide, 12 tensors), and each SiLU's sigmoid the product's (harmless there: int8
LOGISTIC has a fixed output scale).

Methods, each from the tensor's own values on the calibration images (tfconv.py reads them from the
calibrated model with every tensor kept):
- "measured": the true min/max (the calibrator's, repaired);
- "mse": the values are counted into a histogram over the true min/max (BINS bins), and the range written
  back is the one that minimizes the expected squared int8 error over it: values inside the range cost their
  rounding error (step^2 / 12, 255 steps), values outside it their clipping error;
- "percentile:Q": the range holding Q% of the values.
The range always holds 0 (TFLite's zero point must be exact).

numpy only (the method format is parsed by pipeline.targets.range_method): tfconv.py (the TensorFlow
subprocess) reads the calibrated model's tensors, fills the histograms and writes the chosen ranges into the
calibrated model before TensorFlow's quantizer runs on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.targets import range_method

BINS = 2048
LEVELS = 256  # int8


@dataclass
class Histogram:
    """Counts of one tensor's values over a fixed [lo, hi] (which holds 0)."""

    lo: float
    hi: float
    counts: np.ndarray
    seen_lo: float = np.inf  # the smallest and largest values added (exact, whatever [lo, hi] is)
    seen_hi: float = -np.inf

    @classmethod
    def over(cls, lo: float, hi: float, bins: int = BINS) -> Histogram:
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if hi - lo <= 0:
            hi = lo + 1e-8
        return cls(lo, hi, np.zeros(bins, np.float64))

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, np.float64).ravel()
        if v.size:
            self.seen_lo, self.seen_hi = min(self.seen_lo, float(v.min())), max(self.seen_hi, float(v.max()))
        idx = np.floor((v - self.lo) / (self.hi - self.lo) * len(self.counts)).astype(np.int64)
        self.counts += np.bincount(np.clip(idx, 0, len(self.counts) - 1), minlength=len(self.counts))

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, len(self.counts) + 1)

    def centres(self) -> np.ndarray:
        e = self.edges()
        return (e[:-1] + e[1:]) / 2


def mse_range(h: Histogram, levels: int = LEVELS) -> tuple[float, float]:
    """The [lo, hi] (on bin edges, holding 0) with the least expected squared int8 error over `h`."""
    n = h.counts
    if n.sum() == 0:
        return h.lo, h.hi
    c, edges = h.centres(), h.edges()
    a = np.unique(np.append(edges[edges <= 0], 0.0))  # candidate lower ends
    b = np.unique(np.append(edges[edges >= 0], 0.0))  # candidate upper ends
    cum_n, cum_c, cum_c2 = (np.concatenate([[0.0], np.cumsum(w)]) for w in (n, n * c, n * c * c))
    total = (cum_n[-1], cum_c[-1], cum_c2[-1])
    below = np.searchsorted(c, a, side="left")  # bins whose centre is under a: clipped up to a
    above = np.searchsorted(c, b, side="right")  # bins from here on are over b: clipped down to b
    lo_n, lo_c, lo_c2 = cum_n[below], cum_c[below], cum_c2[below]
    lower = lo_n * a * a - 2 * a * lo_c + lo_c2  # sum n (a - c)^2 over the bins under a
    hi_n, hi_c, hi_c2 = total[0] - cum_n[above], total[1] - cum_c[above], total[2] - cum_c2[above]
    upper = hi_n * b * b - 2 * b * hi_c + hi_c2
    inside = total[0] - lo_n[:, None] - hi_n[None, :]
    step = (b[None, :] - a[:, None]) / (levels - 1)
    err = inside * step * step / 12.0 + lower[:, None] + upper[None, :]
    err = np.where(step > 0, err, np.inf)
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(a[i]), float(b[j])


def percentile_range(h: Histogram, q: float) -> tuple[float, float]:
    """The range holding all but (100 - q)% of the values, split between the two tails, widened to hold 0."""
    cdf = np.cumsum(h.counts) / max(h.counts.sum(), 1.0)
    edges = h.edges()
    tail = (100.0 - q) / 200.0
    lo = edges[int(np.searchsorted(cdf, tail, side="left"))]
    hi = edges[int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1]
    return min(float(lo), 0.0), max(float(hi), 0.0)


def measured_range(h: Histogram) -> tuple[float, float]:
    """The smallest and largest values the tensor took, widened to hold 0: its true min/max on the images."""
    if h.seen_lo > h.seen_hi:
        return h.lo, h.hi
    return min(h.seen_lo, 0.0), max(h.seen_hi, 0.0)


def range_picker(method: str) -> Callable[[Histogram], tuple[float, float]] | None:
    """The range function `method` names (pipeline.targets.range_method parses it); None if it names none."""
    parsed = range_method(method)
    if parsed is None:
        return None
    kind, q = parsed
    if kind == "measured":
        return measured_range
    return mse_range if kind == "mse" else lambda h: percentile_range(h, q)
