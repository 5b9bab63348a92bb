"""Latency tables measured on the device itself: probes built here, timed there, cached by device fingerprint.

For each device (ssh, adb or local transport; several at once in parallel):
1. its fingerprint is read with the device probe (CPU, cores, OS, arch, runtime, version) plus the threads and
   delegate the table is for; the cache (pipeline/latency/cache.py) says which probes it already has;
2. the missing probes are built here once for all devices (TensorFlow Lite's converter, build_layers.py);
3. they are copied in batches into a folder on the device and timed there by the device runner's `--many`
   mode (pipeline/remote/bench_runner.py, one process per batch); every finished batch is merged into the
   cache at once, so a device that drops off keeps what it measured and a rerun times only the rest;
4. the whole device's work is bounded by `budget_s` (a DeviceError saying how far it got), and progress is
   logged after every batch (and reported to `on_progress`).

Nothing here raises for one device's failure: each device's `DeviceTable` carries its error, so one lost
device costs nothing of the others.
"""

from __future__ import annotations

import logging
import posixpath
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.bench import RUNNER, parse_runner_output
from pipeline.devices.profile_device import SHORT_S, probe_device
from pipeline.devices.transport import Transport
from pipeline.errors import DeviceError
from pipeline.latency.cache import Fingerprint, TableCache, probe_key
from pipeline.latency.layers import Layer
from pipeline.latency.table import LatencyTable, build_probes, plan_probes, probe_entries, table_entries

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (device, probes done, probes wanted)


@dataclass(frozen=True)
class TableSettings:
    """How the probes are timed on a device (per probe: warm-up, runs, at least/at most seconds), how many are
    copied per batch, and the bound on one device's whole table."""

    threads: int
    warmup: int = 10
    runs: int = 50
    min_seconds: float = 0.1
    max_seconds: float = 10.0
    batch_size: int = 16
    budget_s: float = 1800.0
    delegate: str | None = None


@dataclass(frozen=True)
class DeviceTable:
    """One device's table: the timings of the probes wanted (from the cache and measured now), or its error."""

    device: str
    fingerprint: Fingerprint | None
    info: dict[str, Any]
    timings: dict[str, dict[str, Any]]  # probe key -> {"p50", "mean", "runs", "at"}
    wanted: int
    cached: int  # found in the cache before this run
    measured: int  # timed on the device in this run
    seconds: float
    cache_path: Path | None = None
    error: DeviceError | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and len(self.timings) == self.wanted

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "fingerprint": None if self.fingerprint is None else self.fingerprint.key(),
                "fingerprint_text": None if self.fingerprint is None else self.fingerprint.describe(),
                "machine": self.info.get("machine"), "wanted": self.wanted, "cached": self.cached,
                "measured": self.measured, "seconds": round(self.seconds, 2),
                "cache": None if self.cache_path is None else str(self.cache_path),
                "error": None if self.error is None else str(self.error)}  # fmt: skip


@dataclass
class _Job:
    name: str
    transport: Transport
    entries: list[dict[str, Any]]
    fingerprint: Fingerprint | None = None
    info: dict[str, Any] = field(default_factory=dict)
    cached: dict[str, dict[str, Any]] = field(default_factory=dict)
    got: dict[str, dict[str, Any]] = field(default_factory=dict)  # measured in this run, batch by batch
    error: DeviceError | None = None
    start: float = field(default_factory=time.monotonic)

    def missing(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["key"] not in self.cached]


def keyed_entries(probes: Mapping[str, Mapping[str, Any]], precision: str) -> list[dict[str, Any]]:
    """The probes' build specs, each with its cache key."""
    return [{**e, "key": probe_key(precision, e["geometry"], e["cin"], e["cout"])} for e in probe_entries(probes)]


def _fingerprint(job: _Job, settings: TableSettings, cache: TableCache) -> None:
    try:
        job.info = probe_device(job.transport, timeout_s=max(SHORT_S, 120.0))
    except DeviceError as exc:
        job.error = exc
        return
    except Exception as exc:  # one device's unexpected answer must not lose the others
        log.exception("probing %s", job.name)
        job.error = DeviceError(f"probing {job.name}: {type(exc).__name__}: {exc}")
        return
    job.fingerprint = Fingerprint.from_probe(job.info, threads=settings.threads, delegate=settings.delegate)
    have = cache.entries(job.fingerprint)
    job.cached = {e["key"]: have[e["key"]] for e in job.entries if e["key"] in have}
    log.info("latency table on %s (%s): %d of %d probes cached", job.name, job.fingerprint.describe(),
             len(job.cached), len(job.entries))  # fmt: skip


def _run_checked(transport: Transport, argv: list[str], timeout_s: float, what: str) -> str:
    done = transport.run(argv, timeout_s=timeout_s)
    if done.rc != 0:
        raise DeviceError(f"{what} on {transport.describe()} failed (exit {done.rc}): "
                          f"{(done.stderr or done.stdout).strip()[-600:]}")  # fmt: skip
    return done.stdout


def _time_batch(job: _Job, batch: Sequence[Mapping[str, Any]], folder: str, probe_dir: Path,
                settings: TableSettings, timeout_s: float) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Copy one batch of probes into `folder` on the device, time them with `--many`, remove them."""
    t = job.transport
    _run_checked(t, ["mkdir", "-p", folder], SHORT_S, f"creating {folder}")
    for e in batch:
        t.push(probe_dir / e["file"], posixpath.join(folder, e["file"]), timeout_s=SHORT_S)
    runner = posixpath.join(posixpath.dirname(folder), RUNNER.name)
    argv = [t.python, runner, "--many", folder, "--threads", str(settings.threads), "--warmup", str(settings.warmup),
            "--runs", str(settings.runs), "--min-seconds", str(settings.min_seconds),
            "--max-seconds", str(settings.max_seconds)]  # fmt: skip
    out = _run_checked(t, argv, timeout_s, "timing latency probes")
    timed = parse_runner_output(out, where=t.describe(), key="results")["results"]
    _run_checked(t, ["rm", "-rf", folder], SHORT_S, f"removing {folder}")
    lost = [e["file"] for e in batch if e["file"] not in timed]
    if lost:
        raise DeviceError(f"the runner on {t.describe()} timed no figure for {', '.join(lost[:3])}")
    return {e["key"]: {k: timed[e["file"]][k] for k in ("p50", "mean", "runs")} for e in batch}


def _measure(job: _Job, probe_dir: Path, settings: TableSettings, cache: TableCache,
             on_progress: Progress | None) -> None:  # fmt: skip
    """Time the job's missing probes batch by batch; every batch goes into the cache (and `job.got`) before the
    next starts."""
    assert job.fingerprint is not None
    todo = job.missing()
    if not todo:
        return
    t, deadline = job.transport, job.start + settings.budget_s
    workdir = posixpath.join(t.workdir, f"table-{uuid.uuid4().hex[:10]}")
    try:
        _run_checked(t, ["mkdir", "-p", workdir], SHORT_S, f"creating {workdir}")
        t.push(RUNNER, posixpath.join(workdir, RUNNER.name), timeout_s=SHORT_S)
        for i in range(0, len(todo), settings.batch_size):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceError(f"the latency table on {job.name} did not finish within {settings.budget_s:.0f} s")
            batch = todo[i : i + settings.batch_size]
            new = _time_batch(job, batch, posixpath.join(workdir, f"b{i // settings.batch_size}"), probe_dir,
                              settings, left)  # fmt: skip
            cache.merge(job.fingerprint, new, device=job.name)
            job.got.update(new)
            _progress(job, len(job.cached) + len(job.got), on_progress)
    finally:
        _cleanup(t, workdir)


def _progress(job: _Job, done: int, on_progress: Progress | None) -> None:
    elapsed = time.monotonic() - job.start
    fresh = max(1, done - len(job.cached))
    eta = elapsed / fresh * (len(job.entries) - done)
    log.info("latency table on %s: %d/%d probes, %.0f s elapsed, about %.0f s to go", job.name, done,
             len(job.entries), elapsed, eta)  # fmt: skip
    if on_progress is not None:
        on_progress(job.name, done, len(job.entries))


def _cleanup(t: Transport, workdir: str) -> None:
    try:
        t.run(["rm", "-rf", workdir], timeout_s=SHORT_S)
    except DeviceError as exc:
        log.warning("could not remove %s on %s: %s", workdir, t.describe(), exc)


def _finish(job: _Job, probe_dir: Path, settings: TableSettings, cache: TableCache,
            on_progress: Progress | None) -> DeviceTable:  # fmt: skip
    error = job.error
    if error is None:
        try:
            _measure(job, probe_dir, settings, cache, on_progress)
        except DeviceError as exc:
            error = exc
        except Exception as exc:  # one device's unexpected failure must not lose the others
            log.exception("latency table on %s", job.name)
            error = DeviceError(f"{type(exc).__name__}: {exc}")
    got = dict(job.got)
    if job.fingerprint is not None and error is None:  # what other runs may have added meanwhile
        have = cache.entries(job.fingerprint)
        got.update({e["key"]: have[e["key"]] for e in job.missing() if e["key"] in have and e["key"] not in got})
    timings = {**job.cached, **got}
    if error is not None:
        kept = "; they are kept in the cache and a rerun continues from there" if timings else ""
        error = DeviceError(f"{error} ({len(timings)} of {len(job.entries)} probes measured{kept})")
    path = None if job.fingerprint is None else cache.path(job.fingerprint)
    return DeviceTable(job.name, job.fingerprint, job.info, timings, len(job.entries), len(job.cached),
                       len(job.got), time.monotonic() - job.start, path, error)  # fmt: skip


def measure_device_tables(
    layers: Sequence[Layer],
    groups: Mapping[str, int],
    transports: Mapping[str, Transport],
    *,
    precision: str,
    multiple: int,
    max_ratio: float,
    max_points: int,
    settings: TableSettings,
    probe_dir: Path,
    cache: TableCache | None = None,
    on_progress: Progress | None = None,
) -> tuple[dict[str, Any], dict[str, DeviceTable]]:
    """(the probe plan, each device's table): fingerprints read in parallel, missing probes built once in
    `probe_dir` (kept there for reuse), then timed on every device in parallel."""
    cache = cache or TableCache()
    probes = plan_probes(layers, groups, multiple=multiple, max_ratio=max_ratio, max_points=max_points)
    entries = keyed_entries(probes, precision)
    jobs = {name: _Job(name, t, entries) for name, t in transports.items()}
    with ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix="table") as pool:
        list(pool.map(lambda j: _fingerprint(j, settings, cache), jobs.values()))
        missing = {e["file"]: e for j in jobs.values() if j.error is None for e in j.missing()}
        log.info("latency table: %d probes for %d geometries, %d not cached", len(entries), len(probes), len(missing))
        if missing:
            build_probes(list(missing.values()), precision, probe_dir)
        for j in jobs.values():
            j.start = time.monotonic()  # the time bound counts the device's own work, not the build here
        futures = {n: pool.submit(_finish, j, probe_dir, settings, cache, on_progress) for n, j in jobs.items()}
        return probes, {n: f.result() for n, f in futures.items()}


def latency_table(dt: DeviceTable, probes: Mapping[str, Any], precision: str, *, measured_full_ms: float | None = None
                  ) -> LatencyTable:  # fmt: skip
    """A finished device's LatencyTable (for the allocator), carrying where it was measured."""
    if not dt.complete or dt.fingerprint is None:
        raise DeviceError(f"the latency table of {dt.device} is not complete: {dt.error}")
    ms = {}
    for key, p in probes.items():
        pairs = [(c, c) for c in p["cout"]] if p["geometry"].kind == "depthwise" else [
            (ci, co) for ci in p["cin"] for co in p["cout"]]  # fmt: skip
        for ci, co in pairs:
            ms[(key, ci, co)] = float(dt.timings[probe_key(precision, key, ci, co)]["p50"])
    fp = dt.fingerprint
    return LatencyTable(precision=precision, threads=fp.threads, runtime=fp.runtime,
                        runtime_version=fp.runtime_version, machine=fp.machine, entries=table_entries(probes, ms),
                        device=dt.device, fingerprint=fp.key(), measured_full_ms=measured_full_ms)  # fmt: skip


def slowest(baselines: Mapping[str, float]) -> str:
    """The device whose unpruned model is slowest: the one a shared allocation must meet the budget on."""
    return max(baselines, key=lambda n: baselines[n])
