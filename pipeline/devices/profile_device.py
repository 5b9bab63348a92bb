"""Profile .tflite files on a device through a transport and bring the figures back.

One device: `profile_files` makes a per-run folder on the device, checks the device's Python, numpy and TFLite
interpreter (and says what to pip install there when one is missing), copies the runner
(pipeline/remote/bench_runner.py, plus power_sampler.py when present) and every model, runs the runner once per
model, and removes its folder. If the device goes away half-way, the figures already measured are kept and the
error says so. Several devices: `profile_many` runs them in parallel; one failing device loses nothing of the
others. Android without Python: pass `benchmark_model=` (the device path of TFLite's benchmark_model binary).
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bench import RUNNER, BenchSettings, parse_runner_output, runner_argv
from pipeline.devices.benchmark_model import benchmark_model_argv, parse_benchmark_model
from pipeline.devices.spec import DeviceSpec, open_transport
from pipeline.devices.ssh import SshOptions
from pipeline.devices.transport import Completed, Transport
from pipeline.errors import DeviceError

log = logging.getLogger(__name__)

POWER_SAMPLER = RUNNER.parent / "power_sampler.py"
SHORT_S = 60.0  # small commands (mkdir, rm, probe) on slow or emulated devices

# Runs on the device with its Python (3.6+ syntax, stdlib only): what is there to run the benchmark with.
PROBE = r"""
import json, platform, sys
r = {"python": platform.python_version(), "machine": platform.machine(), "system": platform.system(),
     "release": platform.release(), "node": platform.node(), "errors": {}}
import os
r["cores"], cpu = getattr(os, "cpu_count", lambda: None)(), {}  # Python 2.7 has none: refused below
try:  # the CPU for the latency-table fingerprint: x86 "model name"; ARM "Model"/"Hardware" + core parts
    for line in open("/proc/cpuinfo"):
        k, _, v = line.partition(":")
        k, v = k.strip().lower(), v.strip()
        if k == "cpu part":
            cpu.setdefault("parts", set()).add(v)
        elif k in ("model name", "hardware", "model") and v and not v.isdigit():
            cpu.setdefault(k, v)
except OSError:
    pass
parts = ",".join(sorted(cpu.get("parts", ())))
r["cpu"] = " / ".join(x for x in (cpu.get("model name"), cpu.get("model"), cpu.get("hardware"),
                                  parts and "parts " + parts) if x) or platform.processor() or "unknown"
def ver(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return "unknown"
try:
    import numpy
    r["numpy"] = numpy.__version__
except Exception as e:
    r["numpy"] = None
    r["errors"]["numpy"] = str(e)[-300:]
r["runtime"] = None
if r["numpy"]:
    for mod, dist in (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter",
                      "tflite-runtime"), ("tensorflow.lite", "tensorflow")):
        try:
            __import__(mod, fromlist=["Interpreter"])
        except Exception as e:
            r["errors"][dist] = (type(e).__name__ + ": " + str(e))[-300:]
            continue
        r["runtime"], r["runtime_version"] = dist, ver(dist)
        break
print("EDGESHIP_PROBE " + json.dumps(r))
"""

PIP_HINT = (
    "pip install ai-edge-litert there (Python 3.9-3.12, 64-bit Linux), or on older systems "
    "pip install tflite-runtime 'numpy<2' (tflite-runtime breaks with NumPy 2)"
)


@dataclass(frozen=True)
class DeviceRun:
    """What one device gave: figures per model, per-model failures, and the error that stopped it (if any)."""

    device: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # model -> why (the device itself kept working)
    error: DeviceError | None = None  # the device failed or went away; models after it were not measured
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "info": self.info,
            "results": self.results,
            "failed": self.failed,
            "error": None if self.error is None else str(self.error),
        }


def _check(done: Completed, what: str, where: str) -> Completed:
    if done.rc != 0:
        raise DeviceError(f"{what} on {where} failed (exit {done.rc}): {(done.stderr or done.stdout).strip()[-500:]}")
    return done


def probe_device(transport: Transport, *, timeout_s: float = SHORT_S) -> dict[str, Any]:
    """The device's Python, machine, numpy and TFLite interpreter; a DeviceError saying what to install if one
    is missing."""
    where = transport.describe()
    done = transport.run([transport.python, "-c", PROBE], timeout_s=timeout_s)
    line = next((s for s in done.stdout.splitlines() if s.startswith("EDGESHIP_PROBE ")), None)
    if line is None:
        said = (done.stderr + done.stdout).strip()[-400:]
        if done.rc == 127 or "not found" in said or "No such file" in said:
            raise DeviceError(
                f"no {transport.python!r} on {where}: install Python 3.9+ there (Debian/Raspberry Pi OS: sudo apt "
                "install python3 python3-pip) or set transport.python to its path. Android has no Python: give "
                "the device path of TFLite's benchmark_model binary instead (benchmark_model=...)."
            )
        raise DeviceError(f"{transport.python} on {where} could not run the probe (exit {done.rc}): {said}")
    info = json.loads(line[len("EDGESHIP_PROBE ") :])
    check_probe(info, where=where, python=transport.python)
    return info


def check_probe(info: Mapping[str, Any], *, where: str, python: str) -> None:
    """Refuse a device that cannot run the benchmark, saying what to install there."""
    if tuple(int(x) for x in str(info["python"]).split(".")[:2]) < (3, 9):
        raise DeviceError(f"{where} has Python {info['python']}; the runner needs 3.9 or newer")
    if not info.get("numpy"):
        raise DeviceError(f"numpy is missing on {where} ({python}): {PIP_HINT}")
    if not info.get("runtime"):
        errors = info.get("errors", {})
        tfl = errors.get("tflite-runtime", "")
        if "numpy" in tfl.lower() or "_ARRAY_API" in tfl:
            raise DeviceError(
                f"tflite-runtime on {where} does not work with NumPy {info['numpy']}: pip install 'numpy<2' there "
                f"(or switch to ai-edge-litert). It said: {tfl}"
            )
        raise DeviceError(f"no TFLite interpreter on {where}: {PIP_HINT}. Import errors: {errors}")


def _device_info(transport: Transport, probe: Mapping[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {"transport": transport.kind, "name": transport.describe()}
    for key in ("host", "user", "port", "serial"):
        value = getattr(transport, key, None)
        if value is not None:
            info[key] = value
    info.update({k: probe[k] for k in ("machine", "python", "system", "release", "node") if k in probe})
    if "runtime" in probe:
        info["runtime"], info["runtime_version"] = probe["runtime"], probe.get("runtime_version")
    return info


def _uname_info(transport: Transport) -> dict[str, Any]:
    """Device facts without Python (Android + benchmark_model): uname -m, and getprop where it exists."""
    uname = _check(transport.run(["uname", "-m"], timeout_s=SHORT_S), "uname -m", transport.describe())
    out: dict[str, Any] = {"machine": uname.stdout.strip()}
    model = transport.run(["getprop", "ro.product.model"], timeout_s=SHORT_S)
    if model.rc == 0 and model.stdout.strip():
        out["model"] = model.stdout.strip()
    return out


def profile_files(
    models: Mapping[str, Path],
    settings: BenchSettings,
    transport: Transport,
    *,
    cpus: Sequence[int] = (),
    benchmark_model: str | None = None,
    timeout_s: float = 600.0,
    on_result: Callable[[str, dict[str, Any]], None] | None = None,
) -> DeviceRun:
    """Benchmark every model on one device. Never raises DeviceError: it comes back in `DeviceRun.error` with
    whatever was measured before it."""
    where = transport.describe()
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    info: dict[str, Any] = {}
    error: DeviceError | None = None
    workdir = posixpath.join(transport.workdir, f"run-{uuid.uuid4().hex[:10]}")
    made = False
    try:
        _check(transport.run(["mkdir", "-p", workdir], timeout_s=SHORT_S), f"creating {workdir}", where)
        made = True
        if benchmark_model is None:
            info.update(_device_info(transport, probe_device(transport, timeout_s=max(SHORT_S, timeout_s / 4))))
            transport.push(RUNNER, posixpath.join(workdir, RUNNER.name), timeout_s=SHORT_S)
            if POWER_SAMPLER.is_file():
                transport.push(POWER_SAMPLER, posixpath.join(workdir, POWER_SAMPLER.name), timeout_s=SHORT_S)
        else:
            info.update({"transport": transport.kind, "name": where, **_uname_info(transport)})
        remote: dict[str, str] = {}
        for i, (name, path) in enumerate(models.items()):
            remote[name] = posixpath.join(workdir, f"m{i}.tflite")  # never the user's file name on the device
            transport.push(path, remote[name], timeout_s=max(SHORT_S, timeout_s / 2))
        for name, path in models.items():
            try:
                result = _bench_one(transport, remote[name], workdir, settings, cpus=cpus,
                                    benchmark_model=benchmark_model, timeout_s=timeout_s)  # fmt: skip
            except _ModelFailed as exc:
                failed[name] = str(exc)
                log.warning("%s: %s: %s", where, name, exc)
                continue
            result["size_bytes"] = path.stat().st_size
            result["device"] = {**info, "machine": result.get("machine", info.get("machine"))}
            result["measured"] = f"measured on {where}"
            results[name] = result
            if on_result is not None:
                on_result(name, result)
    except DeviceError as exc:
        kept = f" ({len(results)} of {len(models)} model(s) measured before that are kept)" if results else ""
        error = DeviceError(f"{exc}{kept}")
    finally:
        if made:
            _cleanup(transport, workdir)
    return DeviceRun(device=where, results=results, failed=failed, error=error, info=info)


class _ModelFailed(Exception):
    """One model failed on a device that still answers (a bad file, an op the runtime lacks)."""


def _bench_one(
    transport: Transport,
    model: str,
    workdir: str,
    settings: BenchSettings,
    *,
    cpus: Sequence[int],
    benchmark_model: str | None,
    timeout_s: float,
) -> dict[str, Any]:
    where = transport.describe()
    if benchmark_model is not None:
        argv = benchmark_model_argv(benchmark_model, model, threads=settings.threads, warmup=settings.warmup,
                                    runs=settings.runs, min_seconds=settings.min_seconds,
                                    max_seconds=settings.max_seconds)  # fmt: skip
        if cpus:
            argv = ["taskset", format(sum(1 << c for c in cpus), "x"), *argv]
        done = transport.run(argv, timeout_s=timeout_s)
        if done.rc != 0:
            raise _ModelFailed(f"benchmark_model failed (exit {done.rc}): {(done.stderr + done.stdout)[-800:]}")
        return parse_benchmark_model(done.stdout + "\n" + done.stderr)
    argv = runner_argv(transport.python, posixpath.join(workdir, RUNNER.name), model, settings)
    if cpus:
        argv += ["--cpus", ",".join(str(c) for c in cpus)]
    done = transport.run(argv, timeout_s=timeout_s)
    if done.rc != 0:
        raise _ModelFailed(f"the runner failed (exit {done.rc}): {(done.stderr or done.stdout)[-800:]}")
    try:
        return parse_runner_output(done.stdout, where=where)
    except DeviceError as exc:
        raise _ModelFailed(str(exc)) from None


def _cleanup(transport: Transport, workdir: str) -> None:
    try:
        done = transport.run(["rm", "-rf", workdir], timeout_s=SHORT_S)
        if done.rc != 0:
            log.warning("could not remove %s on %s: %s", workdir, transport.describe(), done.stderr.strip())
    except DeviceError as exc:
        log.warning("could not remove %s on %s: %s", workdir, transport.describe(), exc)


def profile_on_device(
    model: Path,
    settings: BenchSettings,
    transport: Transport,
    *,
    timeout_s: float = 600.0,
    cpus: Sequence[int] = (),
    benchmark_model: str | None = None,
) -> dict[str, Any]:
    """Benchmark one .tflite file on one device; its figures, or a DeviceError."""
    run = profile_files({model.name: model}, settings, transport, cpus=cpus,
                        benchmark_model=benchmark_model, timeout_s=timeout_s)  # fmt: skip
    if run.error is not None:
        raise run.error
    if run.failed:
        raise DeviceError(f"benchmark of {model.name} on {run.device} failed: {run.failed[model.name]}")
    return run.results[model.name]


def profile_many(
    models: Mapping[str, Path] | Path,
    settings: BenchSettings,
    transports: Mapping[str, Transport],
    *,
    cpus: Sequence[int] = (),
    benchmark_model: str | None = None,
    timeout_s: float = 600.0,
) -> dict[str, DeviceRun]:
    """Benchmark the same models on several devices at once (one thread per device), keyed like `transports`."""
    files = {models.name: models} if isinstance(models, Path) else dict(models)

    def one(transport: Transport) -> DeviceRun:
        try:
            return profile_files(files, settings, transport, cpus=cpus,
                                 benchmark_model=benchmark_model, timeout_s=timeout_s)  # fmt: skip
        except Exception as exc:  # a bug or an unexpected failure on one device must not lose the others
            log.exception("profiling on %s", transport.describe())
            return DeviceRun(device=transport.describe(), error=DeviceError(f"{type(exc).__name__}: {exc}"))

    if not transports:
        return {}
    with ThreadPoolExecutor(max_workers=len(transports), thread_name_prefix="profile") as pool:
        futures = {name: pool.submit(one, t) for name, t in transports.items()}
        return {name: f.result() for name, f in futures.items()}


def profile_devices(
    models: Mapping[str, Path],
    settings: BenchSettings,
    devices: Sequence[DeviceSpec],
    *,
    ssh_options: SshOptions | None = None,
    adb_server_port: int | None = None,
    cpus: Sequence[int] = (),
    benchmark_model: str | None = None,
    timeout_s: float = 600.0,
) -> dict[str, DeviceRun]:
    """Open a transport per device spec (pipeline.devices.spec.parse_devices), profile in parallel, close them.
    A device that cannot even be opened (no adb, bad name) gets its error in its DeviceRun like any other."""
    transports: dict[str, Transport] = {}
    runs: dict[str, DeviceRun] = {}
    try:
        for spec in devices:
            try:
                transports[spec.name] = open_transport(spec, ssh_options=ssh_options, adb_server_port=adb_server_port)
            except DeviceError as exc:
                runs[spec.name] = DeviceRun(device=spec.name, error=exc)
        runs.update(profile_many(models, settings, transports, cpus=cpus,
                                 benchmark_model=benchmark_model, timeout_s=timeout_s))  # fmt: skip
    finally:
        for t in transports.values():
            t.close()
    return {spec.name: runs[spec.name] for spec in devices}
