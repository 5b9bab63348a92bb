"""The benchmark runner's API: time .tflite files where they run (size, latency percentiles, memory).

The benchmark itself is `pipeline/remote/bench_runner.py`, run as a separate process so that its peak
memory is the model's and not the pipeline's. `profile_local` runs it on this machine; the device transports
(pipeline/devices) and the latency tables (pipeline/latency) run the same script with the same settings.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import DeviceError
from pipeline.proc import run_tool

if TYPE_CHECKING:
    from pipeline.targets import TargetProfile

log = logging.getLogger(__name__)

RUNNER = Path(__file__).resolve().parent / "remote" / "bench_runner.py"


@dataclass(frozen=True)
class BenchSettings:
    threads: int
    warmup: int
    runs: int
    max_seconds: float = 60.0
    min_seconds: float = 0.0
    extra_args: tuple[str, ...] = ()  # further runner options (--power KIND --power-options JSON, --delegate)


def host_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def power_args(t: TargetProfile) -> tuple[str, ...]:
    """Runner options that sample the profile's power source (none when power.kind is none)."""
    from pipeline.power.energy import sampler_options

    pw = t.power
    if pw.kind == "none":
        return ()
    args = ["--power", pw.kind, "--power-options", json.dumps(sampler_options(pw)), "--idle-seconds", str(pw.idle_s)]
    return (*args, "--power-rate", str(pw.rate_hz)) if pw.rate_hz else tuple(args)


def bench_settings(t: TargetProfile, *, on_host: bool) -> BenchSettings:
    """The profile's benchmark settings. `on_host`: this machine stands in for the target, so threads are capped
    at its cores and power is sampled only when the profile says this machine is the target (a local
    transport). On the target's own device: the profile's threads, its power source sampled."""
    p = t.profiling
    threads = min(p.threads, host_cores()) if on_host else p.threads
    sample = not on_host or t.transport.kind == "local"
    return BenchSettings(threads=threads, warmup=p.warmup, runs=p.runs, min_seconds=p.min_seconds,
                         extra_args=power_args(t) if sample else ())  # fmt: skip


def runner_argv(python: str, runner: str, model: str, s: BenchSettings) -> list[str]:
    return [
        python, runner, "--model", model, "--threads", str(s.threads), "--warmup", str(s.warmup),
        "--runs", str(s.runs), "--max-seconds", str(s.max_seconds), "--min-seconds", str(s.min_seconds),
        *s.extra_args,
    ]  # fmt: skip


def parse_runner_output(stdout: str, *, where: str, key: str = "latency_ms") -> dict[str, Any]:
    """The runner's JSON line (the last line that parses and has `key`), or a DeviceError quoting the output."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and key in result:
            return result
    raise DeviceError(f"the benchmark on {where} printed no result; its output ended with: {stdout[-500:]!r}")


def profile_local(model: Path, settings: BenchSettings, *, timeout_s: float = 600.0) -> dict[str, Any]:
    """Benchmark `model` on this machine in a fresh Python process."""
    argv = runner_argv(sys.executable, str(RUNNER), str(model), settings)
    proc = run_tool(argv, timeout_s=timeout_s)
    if proc.timed_out:
        raise DeviceError(
            f"benchmark of {model.name} on this machine took over {timeout_s:.0f} s; lower profiling.runs"
        )
    if proc.rc != 0:
        raise DeviceError(f"benchmark of {model.name} failed (exit {proc.rc}): {proc.stderr[-1500:]}")
    result = parse_runner_output(proc.stdout, where="this machine")
    result["size_bytes"] = model.stat().st_size
    result["device"] = {"transport": "local", "name": platform.node(), "machine": platform.machine()}
    result["measured"] = "measured on this machine"
    return result
