"""Profile .tflite files where they run: size, latency (warm-up, runs, percentiles), memory.

The benchmark itself is `pipeline/remote/bench_runner.py`, run as a separate process so that its peak
memory is the model's and not the pipeline's. Here it runs on this machine; device transports reuse it.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DeviceError

log = logging.getLogger(__name__)

RUNNER = Path(__file__).resolve().parent.parent / "remote" / "bench_runner.py"


@dataclass(frozen=True)
class BenchSettings:
    threads: int
    warmup: int
    runs: int
    max_seconds: float = 60.0
    min_seconds: float = 0.0
    extra_args: tuple[str, ...] = ()  # further runner options (--power KIND --power-options JSON, --delegate)


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
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DeviceError(
            f"benchmark of {model.name} on this machine took over {timeout_s:.0f} s; lower profiling.runs"
        ) from None
    if proc.returncode != 0:
        raise DeviceError(f"benchmark of {model.name} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    result = parse_runner_output(proc.stdout, where="this machine")
    result["size_bytes"] = model.stat().st_size
    result["device"] = {"transport": "local", "name": platform.node(), "machine": platform.machine()}
    result["measured"] = "measured on this machine"
    return result
