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


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _time(interp, *, warmup: int, runs: int, min_seconds: float, max_seconds: float, during=None) -> list[float]:
    """Warm up, then time invoke() `runs` times (or longer, up to the limits); `during` (a context manager, e.g.
    the power sampler) is entered around the timed loop only."""
    for _ in range(warmup):
        interp.invoke()
    times = []
    with during if during is not None else _Nothing():
        start = time.perf_counter()
        deadline, floor = start + max_seconds, start + min(min_seconds, max_seconds)
        while True:
            s = time.perf_counter()
            interp.invoke()
            now = time.perf_counter()
            times.append((now - s) * 1000)
            if now > deadline or (len(times) >= runs and now >= floor):
                return sorted(times)


def _load_delegate(interpreter_class, name: str):
    """An external delegate by library name (edgetpu -> libedgetpu.so.1), or SystemExit saying what to install."""
    lib = {"edgetpu": "libedgetpu.so.1"}.get(name, name)
    module = sys.modules[interpreter_class.__module__]
    try:
        return module.load_delegate(lib)
    except (OSError, ValueError, AttributeError) as exc:
        raise SystemExit(
            f"DELEGATE_ERROR: cannot load the {name} delegate ({type(exc).__name__}: {exc}). For a Coral USB "
            "Accelerator or Dev Board install the Edge TPU runtime (apt-get install libedgetpu1-std from Coral's "
            "repository), plug the accelerator in, and profile the *_edgetpu.tflite model."
        ) from None


def _power_module():
    """power_sampler.py from beside this script (it is copied with it), or None."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        import power_sampler

        return power_sampler, None
    except Exception as exc:  # e.g. a Python too old for it on the device
        return None, f"power_sampler unavailable: {exc}"


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


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("--delegate", default="", help="external delegate to load: edgetpu, or a library path")
    p.add_argument("--power", default="none", help="power source to sample (power_sampler.py kinds), or none")
    p.add_argument("--power-options", default="{}", help="JSON options for the power sampler")
    p.add_argument("--power-rate", type=float, default=0.0, help="sampling rate in Hz (0: the source's default)")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="idle power is measured this long first")
    return p


def _pin(cpus_text):
    if not cpus_text or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = {int(c) for c in cpus_text.split(",") if c.strip()}
    os.sched_setaffinity(0, cpus)
    return sorted(cpus)


def _power_setup(args):
    """(power_sampler module error, idle reading, sampler): idle power is read before the model loads."""
    if args.power == "none":
        return None, None, None
    options, rate = json.loads(args.power_options), args.power_rate or None
    power_mod, power_error = _power_module()
    if power_mod is None:
        return power_error, None, None
    idle = power_mod.measure_idle(args.power, args.idle_seconds, rate_hz=rate, options=options)
    return power_error, idle, power_mod.Sampler(args.power, rate_hz=rate, options=options)


def _load(interpreter_class, args):
    delegates = [_load_delegate(interpreter_class, args.delegate)] if args.delegate else None
    if delegates:
        interp = interpreter_class(model_path=args.model, num_threads=args.threads, experimental_delegates=delegates)
    else:
        interp = interpreter_class(model_path=args.model, num_threads=args.threads)
    interp.allocate_tensors()
    return interp


def _latency(ms):
    mean = sum(ms) / len(ms)
    std = (sum((t - mean) ** 2 for t in ms) / len(ms)) ** 0.5
    return {
        "p50": round(_percentile(ms, 0.50), 4),
        "p90": round(_percentile(ms, 0.90), 4),
        "p99": round(_percentile(ms, 0.99), 4),
        "mean": round(mean, 4),
        "std": round(std, 4),
        "min": round(ms[0], 4),
        "max": round(ms[-1], 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.many):
        p.error("give exactly one of --model or --many")

    import numpy as np

    if args.many:
        return _many(np, args)
    pinned = _pin(args.cpus)
    interpreter_class, runtime, runtime_version = _interpreter_class()
    power_error, idle, sampler = _power_setup(args)
    rss_start = _rss_kib()  # after numpy and the runtime are imported: what follows is the model's
    t0 = time.perf_counter()
    interp = _load(interpreter_class, args)
    load_ms = (time.perf_counter() - t0) * 1000
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], _random_input(np, inp))
    ms = _time(interp, warmup=args.warmup, runs=args.runs, min_seconds=args.min_seconds,
               max_seconds=args.max_seconds, during=sampler)  # fmt: skip
    interp.get_tensor(interp.get_output_details()[0]["index"])
    result = {
        "runtime": runtime,
        "runtime_version": runtime_version,
        "xnnpack": _uses_xnnpack(interp),
        "threads": args.threads,
        "pinned_cpus": pinned,
        "warmup": args.warmup,
        "runs": len(ms),
        "load_ms": round(load_ms, 3),
        "latency_ms": _latency(ms),
        "rss_start_kib": rss_start,
        "peak_rss_kib": _peak_rss_kib(),
        "model_rss_kib": max(0, _peak_rss_kib() - rss_start),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "input": {"shape": [int(d) for d in inp["shape"]], "dtype": np.dtype(inp["dtype"]).name},
        "quantiles_ms": [round(_percentile(ms, q / 100), 4) for q in range(0, 101, 5)],  # the distribution
        "delegate": args.delegate or None,
    }
    if args.power != "none":
        active = sampler.result() if sampler is not None else None
        errors = [power_error] if power_error else []
        result["power"] = {"kind": args.power, "idle": idle, "active": active, "errors": errors}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
