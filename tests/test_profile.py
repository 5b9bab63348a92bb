"""The benchmark runner on a real .tflite file: real interpreter, real timings, real memory figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.bench import RUNNER, BenchSettings, parse_runner_output, profile_local
from pipeline.errors import DeviceError


def _tiny_tflite(path: Path) -> Path:
    """A real float32 .tflite file written with TensorFlow's own converter (a 1x8x8x3 -> 10 conv net)."""
    code = f"""
import os; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
tf.random.set_seed(0)
m = tf.keras.Sequential([tf.keras.Input((8, 8, 3), batch_size=1), tf.keras.layers.Conv2D(8, 3),
                         tf.keras.layers.GlobalAveragePooling2D(), tf.keras.layers.Dense(10)])
open({str(path)!r}, "wb").write(tf.lite.TFLiteConverter.from_keras_model(m).convert())
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, capture_output=True)
    return path


@pytest.fixture(scope="module")
def tflite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_tflite(tmp_path_factory.mktemp("tfl") / "m.tflite")


@pytest.mark.slow
def test_profile_local_measures(tflite_file: Path) -> None:
    r = profile_local(tflite_file, BenchSettings(threads=1, warmup=3, runs=50))
    lat = r["latency_ms"]
    assert r["runs"] == 50 and r["runtime"] == "ai-edge-litert"
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["std"] >= 0 and lat["mean"] > 0
    assert r["size_bytes"] == tflite_file.stat().st_size
    assert r["peak_rss_kib"] > r["model_rss_kib"] >= 0
    assert r["input"] == {"shape": [1, 8, 8, 3], "dtype": "float32"}
    assert r["measured"] == "measured on this machine"


@pytest.mark.slow
def test_runner_time_limit_stops_early(tflite_file: Path) -> None:
    r = profile_local(tflite_file, BenchSettings(threads=1, warmup=0, runs=10_000_000, max_seconds=0.2))
    assert 1 <= r["runs"] < 10_000_000


def test_missing_model_is_a_device_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"benchmark of nope.tflite failed"):
        profile_local(tmp_path / "nope.tflite", BenchSettings(threads=1, warmup=0, runs=1))


def test_parse_runner_output_quotes_garbage() -> None:
    with pytest.raises(DeviceError, match=r"printed no result.*Segmentation"):
        parse_runner_output("Segmentation fault\n", where="pi")
    assert parse_runner_output('noise\n{"latency_ms": {"p50": 1}}\n', where="x")["latency_ms"]["p50"] == 1


def test_runner_is_standalone() -> None:
    """The device-side runner must not import edgeship: it is copied alone to devices (power_sampler.py beside
    it). Its imports are the standard library, numpy, and a TFLite interpreter looked up by name at run time;
    at module level only the standard library, so it starts (and --help works) with no site-packages at all."""
    import ast

    text = RUNNER.read_text()
    assert "import pipeline" not in text and "from pipeline" not in text
    tree = ast.parse(text)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - set(sys.stdlib_module_names) == {"numpy", "power_sampler"}
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite"):
        assert f'"{module}"' in text  # __import__'ed by name, in this order of preference
    bare = subprocess.run([sys.executable, "-S", str(RUNNER), "--help"], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and "--model" in bare.stdout, bare.stderr
    no_numpy = subprocess.run([sys.executable, "-S", str(RUNNER), "--model", "m.tflite"], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
    assert no_numpy.returncode != 0 and "No module named 'numpy'" in no_numpy.stderr  # numpy: imported, after argv


def _runner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=120)


def test_runner_without_the_edgetpu_runtime_says_what_to_install(tflite_file: Path) -> None:
    proc = _runner("--model", str(tflite_file), "--runs", "5", "--delegate", "edgetpu")
    assert proc.returncode != 0
    assert "DELEGATE_ERROR: cannot load the edgetpu delegate" in proc.stderr
    assert "libedgetpu.so.1: cannot open shared object file" in proc.stderr  # the runtime's own OSError text
    assert "libedgetpu1-std" in proc.stderr


def test_runner_samples_power_during_the_timed_runs_and_idle_before(tflite_file: Path) -> None:
    import json

    root = Path(__file__).parent / "data" / "power" / "hwmon" / "ina226"
    proc = _runner("--model", str(tflite_file), "--runs", "50", "--min-seconds", "0.3", "--power", "hwmon",
                   "--power-options", json.dumps({"root": str(root)}), "--idle-seconds", "0.2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    power = parse_runner_output(proc.stdout, where="here")["power"]
    assert power["kind"] == "hwmon" and power["errors"] == []
    for phase in ("idle", "active"):
        reading = power[phase]
        assert reading["ok"] and reading["samples"] >= 2, reading
        assert reading["avg_w"] == pytest.approx(6.150, rel=1e-3)  # the fixture's power1_input
    assert power["active"]["duration_s"] >= 0.25


def test_runner_reports_the_latency_distribution(tflite_file: Path) -> None:
    result = parse_runner_output(_runner("--model", str(tflite_file), "--runs", "40").stdout, where="here")
    q = result["quantiles_ms"]
    assert len(q) == 21 and q == sorted(q)
    assert q[10] == pytest.approx(result["latency_ms"]["p50"], rel=1e-3) and q[0] == result["latency_ms"]["min"]
