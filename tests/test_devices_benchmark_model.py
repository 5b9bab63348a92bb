"""`benchmark_model` output parsing on text in its real formats (tests/data/benchmark_model/README.md), its argv,
and the device probe's verdicts (what to install on the device) on the probe's own JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.devices.benchmark_model import benchmark_model_argv, parse_benchmark_model
from pipeline.devices.profile_device import check_probe
from pipeline.errors import DeviceError

DATA = Path(__file__).parent / "data" / "benchmark_model"


def test_modern_output_with_percentiles_memory_and_xnnpack() -> None:
    r = parse_benchmark_model((DATA / "modern_xnnpack.txt").read_text())
    assert r["runs"] == 181 and r["warmup"] == 89 and r["threads"] == 4
    assert r["latency_ms"] == {"mean": 5.5422, "std": 0.117, "min": 5.347, "max": 6.244, "p5": 5.401, "p50": 5.53,
                               "p95": 5.702}  # fmt: skip
    assert "p90" not in r["latency_ms"] and "p99" not in r["latency_ms"]  # the tool does not report them
    assert (r["init_ms"], r["first_inference_ms"], r["warmup_avg_ms"]) == (5.046, 10.938, 5.6723)
    assert r["memory_delta_mb"] == {"init": 3.10547, "overall": 7.5}
    assert r["peak_rss_kib"] == round(12.3047 * 1024) and r["model_size_mb"] == 4.27661
    assert r["xnnpack"] and r["delegated_nodes"] == {"delegate": "TfLiteXNNPackDelegate", "nodes": 31, "of": 31}
    assert r["load_ms"] == 5.046 and r["runtime"] == "benchmark_model"


def test_old_output_without_prefix_and_scientific_averages() -> None:
    r = parse_benchmark_model((DATA / "old_plain.txt").read_text())
    assert r["runs"] == 50 and r["warmup"] == 1 and r["threads"] == 1
    assert r["latency_ms"]["mean"] == 2950.34 and r["latency_ms"]["min"] == 2727.568
    assert r["latency_ms"]["std"] == 109.798 and "p50" not in r["latency_ms"]
    assert r["memory_delta_mb"] == {"init": 4.21094, "overall": 46.0859} and "peak_rss_kib" not in r
    assert r["first_inference_ms"] == 3512.391 and r["load_ms"] == 17.187 and not r["xnnpack"]


def test_logcat_prefix() -> None:
    r = parse_benchmark_model((DATA / "logcat.txt").read_text())
    assert r["runs"] == 8270 and r["latency_ms"]["p50"] == 0.116 and r["latency_ms"]["mean"] == 0.1189
    assert r["threads"] == 2 and r["memory_delta_mb"]["overall"] == 0.5


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ERROR: Could not open '/data/local/tmp/m.tflite'.\nERROR: Benchmarking failed.\n",
        "INFO: count=50 first=1 curr=1 min=1 max=1 avg=1 std=0\n",  # killed before the summary line
    ],
)
def test_no_timings_is_a_device_error_quoting_the_output(text: str) -> None:
    with pytest.raises(DeviceError, match="benchmark_model printed no timings"):
        parse_benchmark_model(text)


def test_argv() -> None:
    argv = benchmark_model_argv("/data/local/tmp/benchmark_model", "/data/local/tmp/m 0.tflite", threads=4,
                                warmup=20, runs=200, min_seconds=2.0, max_seconds=60.0)  # fmt: skip
    assert argv == [
        "/data/local/tmp/benchmark_model", "--graph=/data/local/tmp/m 0.tflite", "--num_threads=4",
        "--warmup_runs=20", "--num_runs=200", "--min_secs=2.0", "--max_secs=60.0", "--use_xnnpack=true",
    ]  # fmt: skip


BASE = {"python": "3.11.2", "machine": "aarch64", "numpy": "1.26.4", "runtime": "tflite-runtime", "errors": {}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"python": "3.7.3"}, r"has Python 3.7.3; the runner needs 3.9"),
        ({"numpy": None, "runtime": None}, r"numpy is missing on pi@x \(python3\): pip install ai-edge-litert"),
        (
            {"runtime": None, "numpy": "2.1.0", "errors": {"tflite-runtime": "ImportError: numpy.core.multiarray "
                                                           "failed to import (_ARRAY_API not found)"}},
            r"tflite-runtime on pi@x does not work with NumPy 2.1.0: pip install 'numpy<2'",
        ),
        ({"runtime": None, "errors": {"tflite-runtime": "No module named 'tflite_runtime'"}},
         r"no TFLite interpreter on pi@x: pip install ai-edge-litert .*tflite-runtime 'numpy<2'"),
    ],
)  # fmt: skip
def test_probe_verdicts(change: dict, message: str) -> None:
    check_probe(BASE, where="pi@x", python="python3")
    with pytest.raises(DeviceError, match=message):
        check_probe({**BASE, **change}, where="pi@x", python="python3")
