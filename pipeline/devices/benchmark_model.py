"""TFLite's `benchmark_model` binary (the usual way to time a model on Android): run it, parse its text.

The text format (stdout/stderr, lines with or without an `INFO: ` or logcat `I tflite  : ` prefix):
    INFO: Initialized session in 5.046ms.
    INFO: count=89 first=10938 curr=5481 min=5362 max=10938 avg=5672.27 std=572           (warm-up)
    INFO: count=181 first=5557 curr=5474 min=5347 max=6244 avg=5542.2 std=117 p5=5401 median=5530 p95=5702
    INFO: Inference timings in us: Init: 5046, First inference: 10938, Warmup (avg): 5672.27, Inference (avg): 5542.2
    INFO: Memory footprint delta from the start of the tool (MB): init=3.1 overall=7.5
    INFO: Overall peak memory footprint (MB) via periodic monitoring: 12.3
Older builds print `Peak memory footprint (MB): init=... overall=...`, and `p5/median/p95` only in newer
builds. It reports no p90/p99: those keys are left out rather than guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.errors import DeviceError

_NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
# (not the op profiler's "Timings (microseconds): count=..." / "Memory (bytes): count=..." summaries)
_COUNT = re.compile(r"(?<!\): )count=(\d+)(?P<rest>(?:\s+\w+=" + _NUM + r")*)")
_KV = re.compile(r"(\w+)=" + _NUM)
_SUMMARY = re.compile(
    r"Inference timings in us: Init: " + _NUM + r", First inference: " + _NUM + r", Warmup \(avg\): " + _NUM
    + r", Inference \(avg\): " + _NUM
)  # fmt: skip
_MEM = re.compile(r"(?:Memory footprint delta from the start of the tool|Peak memory footprint) \(MB\): init="
                  + _NUM + r" overall=" + _NUM)  # fmt: skip
_PEAK = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: " + _NUM)
_INIT = re.compile(r"Initialized session in " + _NUM + r"\s*ms")
_SIZE = re.compile(r"The input model file size \(MB\): " + _NUM)
_THREADS = re.compile(r"#threads used for CPU inference: \[(\d+)\]|Num threads: \[(\d+)\]")
_DELEGATED = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \((\w+)\)")


def parse_benchmark_model(output: str) -> dict[str, Any]:
    """The figures of one `benchmark_model` run, in the runner's units (ms, KiB) where they exist."""
    summary = _SUMMARY.search(output)
    counts = [m for m in _COUNT.finditer(output)]
    if summary is None or not counts:
        raise DeviceError(
            "benchmark_model printed no timings (no 'Inference timings in us' line); its output ended with: "
            f"{output.strip()[-600:]!r}"
        )
    init_us, first_us, warmup_us, infer_us = (float(g) for g in summary.groups())
    timed = counts[-1]  # the last count= line is the timed run; earlier ones are the warm-up
    stats = {k: float(v) for k, v in _KV.findall(timed.group(0))}
    warm = {k: float(v) for k, v in _KV.findall(counts[0].group(0))} if len(counts) > 1 else {}
    latency: dict[str, float] = {
        "mean": round(infer_us / 1000, 4),
        "std": round(stats.get("std", 0.0) / 1000, 4),
        "min": round(stats.get("min", infer_us) / 1000, 4),
        "max": round(stats.get("max", infer_us) / 1000, 4),
    }
    for key, name in (("p5", "p5"), ("median", "p50"), ("p95", "p95")):
        if key in stats:
            latency[name] = round(stats[key] / 1000, 4)
    result: dict[str, Any] = {
        "runtime": "benchmark_model",
        "runs": int(stats["count"]),
        "warmup": int(warm.get("count", 0)),
        "latency_ms": latency,
        "first_inference_ms": round(first_us / 1000, 4),
        "warmup_avg_ms": round(warmup_us / 1000, 4),
        "init_ms": round(init_us / 1000, 4),
        "xnnpack": "XNNPACK delegate" in output or "TfLiteXNNPackDelegate" in output,
    }
    if m := _INIT.search(output):
        result["load_ms"] = float(m.group(1))
    if m := _MEM.search(output):
        result["memory_delta_mb"] = {"init": float(m.group(1)), "overall": float(m.group(2))}
    if m := _PEAK.search(output):
        result["peak_rss_kib"] = round(float(m.group(1)) * 1024)
    if m := _SIZE.search(output):
        result["model_size_mb"] = float(m.group(1))
    if m := _THREADS.search(output):
        result["threads"] = int(m.group(1) or m.group(2))
    if m := _DELEGATED.search(output):
        result["delegated_nodes"] = {"delegate": m.group(3), "nodes": int(m.group(1)), "of": int(m.group(2))}
    return result


def benchmark_model_argv(
    binary: str,
    model: str,
    *,
    threads: int,
    warmup: int,
    runs: int,
    min_seconds: float,
    max_seconds: float,
    extra: Sequence[str] = (),
) -> list[str]:
    """argv for `benchmark_model` with the profile's settings (XNNPACK on). Builds that know it can be asked for
    the sampled peak memory with extra=["--report_peak_memory_footprint=true"] (older ones refuse unknown flags)."""
    return [
        binary, f"--graph={model}", f"--num_threads={threads}", f"--warmup_runs={warmup}", f"--num_runs={runs}",
        f"--min_secs={min_seconds}", f"--max_secs={max_seconds}", "--use_xnnpack=true", *extra,
    ]  # fmt: skip
