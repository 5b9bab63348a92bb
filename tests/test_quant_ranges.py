"""Activation ranges from histograms (pipeline/quantize/ranges.py): the chosen range lowers the int8 error."""

import numpy as np

from pipeline.quantize.ranges import Histogram, measured_range, mse_range, percentile_range, range_picker


def _int8_mse(v: np.ndarray, lo: float, hi: float) -> float:
    step = (hi - lo) / 255
    zero = np.round(-lo / step)
    q = (np.clip(np.round(v / step) + zero, 0, 255) - zero) * step
    return float(np.mean((v - q) ** 2))


def _hist(v: np.ndarray) -> Histogram:
    h = Histogram.over(v.min(), v.max())
    h.add(v)
    return h


def test_mse_range_beats_min_max_on_a_long_tail():
    v = np.random.default_rng(0).standard_t(3, 200_000)
    lo, hi = mse_range(_hist(v))
    assert lo <= 0 <= hi
    assert hi - lo < v.max() - v.min()
    assert _int8_mse(v, lo, hi) < 0.8 * _int8_mse(v, v.min(), v.max())


def test_mse_range_of_non_negative_values_starts_at_zero():
    v = np.abs(np.random.default_rng(1).normal(0, 1, 50_000))
    lo, hi = mse_range(_hist(v))
    assert lo == 0.0 and 0 < hi <= v.max() + 1e-9


def test_percentile_range_holds_zero_and_the_bulk():
    v = np.abs(np.random.default_rng(2).normal(3, 1, 100_000)) + 0.1  # all positive: the range is widened down to 0
    lo, hi = percentile_range(_hist(v), 99.9)
    assert lo == 0.0
    assert np.mean(v <= hi) > 0.999 - 0.002 and hi < v.max()


def test_empty_histogram_keeps_its_range():
    h = Histogram.over(-1.0, 2.0)
    assert mse_range(h) == (-1.0, 2.0)


def test_measured_range_is_the_values_own_min_max_not_the_recorded_one():
    """A histogram laid over a recorded range 30x too wide (TFLite's calibrator on an in-place op's input):
    "measured" gives the values' own min/max (widened to hold 0), whatever range the bins cover."""
    v = np.random.default_rng(3).uniform(0.2, 2.5, 10_000)
    h = Histogram.over(0.0, 75.0)
    h.add(v[:5000])
    h.add(v[5000:])
    assert range_picker("measured")(h) == (0.0, float(v.max()))
    assert measured_range(Histogram.over(-1.0, 2.0)) == (-1.0, 2.0)  # nothing seen: the range it was given
