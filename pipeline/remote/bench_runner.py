"""Benchmark one .tflite file where it will run. Needs only numpy and a TFLite interpreter.

This file is copied to devices and run there as a script (``python3 bench_runner.py --model m.tflite``):
it must not import anything from edgeship. It prints one JSON object on stdout.

Interpreter: ai-edge-litert when installed (XNNPACK on by default), else tflite-runtime (older devices;
it does not delegate int8 to XNNPACK, so int8 is much slower there), else TensorFlow's tf.lite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status in KiB (Linux; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kib() -> int:
    return _status_kib("VmRSS")


def _peak_rss_kib() -> int:
    """Peak resident set size since exec. VmHWM, not ru_maxrss: after fork+exec, ru_maxrss can still report
    the parent's peak (a 700 MB PyTorch parent made a 46 MB benchmark look like 700 MB)."""
    peak = _status_kib("VmHWM")
    if peak:
        return peak
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(usage // 1024) if sys.platform == "darwin" else int(usage)


def _interpreter_class():
    """The first TFLite interpreter importable here: (class, runtime name, version)."""
    errors = []
    for module, version_of in (
        ("ai_edge_litert.interpreter", "ai-edge-litert"),
        ("tflite_runtime.interpreter", "tflite-runtime"),
        ("tensorflow.lite", "tensorflow"),
    ):
        try:
            mod = __import__(module, fromlist=["Interpreter"])
        except ImportError as exc:
            errors.append(f"{module}: {exc}")
            continue
        return mod.Interpreter, version_of, _version(version_of)
    raise SystemExit(
        "no TFLite interpreter on this device: pip install ai-edge-litert (or tflite-runtime); " + "; ".join(errors)
    )


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return "unknown"


def _uses_xnnpack(interp) -> bool:
    try:
        return any(op.get("op_name") == "DELEGATE" for op in interp._get_ops_details())
    except Exception:
        return False


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    pos = (len(sorted_ms) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def _random_input(np, detail):
    shape, dtype = detail["shape"], detail["dtype"]
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _time(interp, *, warmup: int, runs: int, min_seconds: float, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        interp.invoke()
    times = []
    start = time.perf_counter()
    deadline, floor = start + max_seconds, start + min(min_seconds, max_seconds)
    while True:
        s = time.perf_counter()
        interp.invoke()
        now = time.perf_counter()
        times.append((now - s) * 1000)
        if now > deadline or (len(times) >= runs and now >= floor):
            return sorted(times)


def _many(np, args) -> int:
    """Time every .tflite file of a folder in this one process (the latency table's probes)."""
    interpreter_class, runtime, runtime_version = _interpreter_class()
    results = {}
    for name in sorted(os.listdir(args.many)):
        if not name.endswith(".tflite"):
            continue
        interp = interpreter_class(model_path=os.path.join(args.many, name), num_threads=args.threads)
        interp.allocate_tensors()
        inp = interp.get_input_details()[0]
        interp.set_tensor(inp["index"], _random_input(np, inp))
        ms = _time(
            interp, warmup=args.warmup, runs=args.runs, min_seconds=args.min_seconds, max_seconds=args.max_seconds
        )
        results[name] = {"p50": round(_percentile(ms, 0.5), 5), "mean": round(sum(ms) / len(ms), 5), "runs": len(ms)}
    print(
        json.dumps(
            {
                "runtime": runtime,
                "runtime_version": runtime_version,
                "threads": args.threads,
                "machine": platform.machine(),
                "results": results,
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="the .tflite file to benchmark")
    p.add_argument("--many", help="benchmark every .tflite file in this folder (p50/mean per file)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop the timed runs after this long")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="keep timing past --runs until this long has passed (steadier percentiles for fast models)",
    )
    p.add_argument("--cpus", default="", help="pin to these CPUs (comma list), where the OS allows it")
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.many):
        p.error("give exactly one of --model or --many")

    import numpy as np

    if args.many:
        return _many(np, args)

    pinned = None
    if args.cpus and hasattr(os, "sched_setaffinity"):
        cpus = {int(c) for c in args.cpus.split(",") if c.strip()}
        os.sched_setaffinity(0, cpus)
        pinned = sorted(cpus)
    interpreter_class, runtime, runtime_version = _interpreter_class()
    rss_start = _rss_kib()  # after numpy and the runtime are imported: what follows is the model's
    t0 = time.perf_counter()
    interp = interpreter_class(model_path=args.model, num_threads=args.threads)
    interp.allocate_tensors()
    load_ms = (time.perf_counter() - t0) * 1000
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], _random_input(np, inp))
    ms = _time(interp, warmup=args.warmup, runs=args.runs, min_seconds=args.min_seconds, max_seconds=args.max_seconds)
    out = interp.get_output_details()[0]
    interp.get_tensor(out["index"])
    mean = sum(ms) / len(ms)
    std = (sum((t - mean) ** 2 for t in ms) / len(ms)) ** 0.5
    result = {
        "runtime": runtime,
        "runtime_version": runtime_version,
        "xnnpack": _uses_xnnpack(interp),
        "threads": args.threads,
        "pinned_cpus": pinned,
        "warmup": args.warmup,
        "runs": len(ms),
        "load_ms": round(load_ms, 3),
        "latency_ms": {
            "p50": round(_percentile(ms, 0.50), 4),
            "p90": round(_percentile(ms, 0.90), 4),
            "p99": round(_percentile(ms, 0.99), 4),
            "mean": round(mean, 4),
            "std": round(std, 4),
            "min": round(ms[0], 4),
            "max": round(ms[-1], 4),
        },
        "rss_start_kib": rss_start,
        "peak_rss_kib": _peak_rss_kib(),
        "model_rss_kib": max(0, _peak_rss_kib() - rss_start),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "input": {"shape": [int(d) for d in inp["shape"]], "dtype": np.dtype(inp["dtype"]).name},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
