"""Stage `latency_table`: the measured per-layer latency table of this model on the device it will run on (only
when the profile prunes to a latency budget: `pruning.target: {metric: latency}`).

The device is the one the profile stage profiles on: DEVICE (`a,b,c` for several), else the profile's own
transport (ssh host, adb serial), else this machine as a stand-in. Probes are timed there and cached per device
fingerprint (pipeline/latency/device_table.py, cache.py), so another model or deploy on the same kind of device
reuses every probe geometry it shares. The unpruned model is measured on each device too: it calibrates the
table, and with several devices the allocation is made against the slowest one (the budget is met there, and
assumed met on the faster ones; per-device bundles are not built).
"""

from __future__ import annotations

import platform
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.bench import RUNNER, bench_settings, host_cores
from pipeline.errors import DeviceError
from pipeline.stages.base import Context, FlatResult, Stage
from pipeline.stages.baseline import BASELINE
from pipeline.stages.convert_baseline import CONVERT_BASELINE

TABLE_FILE = "table.json"


@dataclass(frozen=True)
class LatencyTableResult(FlatResult):
    geometries: int
    probes: int
    runtime: str
    machine: str
    threads: int
    measured_on: str = "this machine"  # the device whose table the allocation uses
    fingerprint: str = ""  # its cache key; `edgeship tables` lists it
    fingerprint_text: str = ""
    baseline_ms: float | None = None  # the unpruned model measured there (calibrates the table)
    probes_cached: int = 0  # of `probes`, found in the cache
    seconds: float = 0.0
    devices: Mapping[str, Any] | None = None  # every device's table run and unpruned latency

    @property
    def table_path(self) -> Path:
        return self.folder / TABLE_FILE

    def where(self) -> str:
        """One line for reports: where the table was measured and how much was reused."""
        many = f"; slowest of {len(self.devices)} devices" if self.devices and len(self.devices) > 1 else ""
        return (f"latency table measured on {self.measured_on} ({self.fingerprint_text or self.machine}{many}): "
                f"{self.probes} probes, {self.probes_cached} from the cache")  # fmt: skip


def runtime_versions() -> dict[str, str]:
    """The TFLite runtimes installed here: a table measured under other versions is measured again."""
    found = {}
    for dist in ("ai-edge-litert", "tflite-runtime", "tensorflow"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def _specs(ctx: Context) -> tuple[tuple[Any, ...], bool]:
    """(the devices to measure on, whether this machine stands in for the target)."""
    from pipeline.devices.spec import DeviceSpec, target_devices

    specs = target_devices(ctx.req)
    return (specs, False) if specs else ((DeviceSpec("local", python=sys.executable),), True)


def _threads(ctx: Context) -> int:
    return bench_settings(ctx.target, on_host=_specs(ctx)[1]).threads


class LatencyTableStage(Stage[LatencyTableResult]):
    name = "latency_table"
    result = LatencyTableResult
    version = 2  # measured on the device, through the fingerprint cache

    def applies(self, ctx: Context) -> bool:
        p = ctx.target.pruning
        by_latency = p.target.metric == "accuracy" and p.search.rank == "latency"
        return p.enabled and (p.target.metric == "latency" or by_latency)

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        base = ctx.get(CONVERT_BASELINE).tflite(ctx.target.quantize.plan_precision)
        return {"model": ctx.get(BASELINE).model_path, "baseline": base, "runner": RUNNER}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        t, p = ctx.target, ctx.target.pruning
        specs, on_host = _specs(ctx)
        where = {"host": platform.node(), "cores": host_cores(), "runtime": runtime_versions()} if on_host else {
            "devices": [s.name for s in specs]}  # fmt: skip
        return {"precision": t.quantize.plan_precision, "threads": _threads(ctx), "multiple": p.channel_multiple,
                "max_ratio": p.max_layer_ratio, "max_points": p.target.max_points, "keep_layers": p.keep_layers,
                **where, "profiling": t.profiling.model_dump(mode="json"), "format": "edgeship-latency/2"}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> LatencyTableResult:
        from pipeline.latency.layers import prunable_layers
        from pipeline.pruning.channels import ignored_layers, prunable_groups

        p = ctx.target.pruning
        model, ex = ctx.load(ctx.get(BASELINE).model_path), ctx.example()
        groups = prunable_groups(model, ex, keep_layers=p.keep_layers)
        layers = prunable_layers(model, ex, ignored=ignored_layers(model, ex, p.keep_layers))
        return measure_for_target(ctx, layers, groups, out)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def measure_for_target(ctx: Context, layers: Any, groups: Mapping[str, int], out: Path) -> LatencyTableResult:
    """Measure the table on every device of the deploy; keep each one's, allocate against the slowest."""
    from pipeline.devices.profile_device import profile_files
    from pipeline.devices.spec import open_transport
    from pipeline.latency.device_table import TableSettings, latency_table, measure_device_tables, slowest

    t, p = ctx.target, ctx.target.pruning
    specs, on_host = _specs(ctx)
    bench = replace(bench_settings(t, on_host=on_host), extra_args=())  # no power sampling for calibration
    base_tflite = ctx.get(CONVERT_BASELINE).tflite(t.quantize.plan_precision)
    transports: dict[str, Any] = {}
    try:
        for spec in specs:
            transports[spec.name] = open_transport(spec, ssh_options=ctx.req.ssh_options)
        probes, runs = measure_device_tables(
            layers, groups, transports, precision=t.quantize.plan_precision, multiple=p.channel_multiple,
            max_ratio=p.max_layer_ratio, max_points=p.target.max_points,
            settings=TableSettings(threads=bench.threads), probe_dir=out / "probes")  # fmt: skip
        bad = {n: r.error for n, r in runs.items() if not r.complete}
        if bad:
            raise DeviceError("the latency table could not be measured on " + "; ".join(f"{n}: {e}" for n, e in
                              bad.items()))  # fmt: skip
        baselines = {}
        for name, tr in transports.items():
            run = profile_files({"baseline": base_tflite}, bench, tr)
            if run.error is not None or run.failed:
                raise DeviceError(f"timing the unpruned model on {name} failed: {run.error or run.failed}")
            baselines[name] = float(run.results["baseline"]["latency_ms"]["p50"])
    finally:
        for tr in transports.values():
            tr.close()
    shutil.rmtree(out / "probes", ignore_errors=True)
    for name, run in runs.items():
        latency_table(run, probes, t.quantize.plan_precision, measured_full_ms=baselines[name]).save(
            out / "tables" / f"{_safe(name)}.json")  # fmt: skip
    chosen = slowest(baselines)
    run = runs[chosen]
    table = latency_table(run, probes, t.quantize.plan_precision, measured_full_ms=baselines[chosen])
    table.save(out / TABLE_FILE)
    fp = run.fingerprint
    assert fp is not None
    devices = {n: {**r.to_json(), "baseline_ms": baselines[n]} for n, r in runs.items()}
    shown = "this machine" if on_host else chosen
    return LatencyTableResult(out, len(table.entries), run.wanted, f"{fp.runtime} {fp.runtime_version}", fp.machine,
                              fp.threads, shown, fp.key(), fp.describe(), baselines[chosen], run.cached,
                              round(sum(r.seconds for r in runs.values()), 2), devices)  # fmt: skip


LATENCY_TABLE = LatencyTableStage()


def table_summary(ctx: Context, devices: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Where the table was measured, for the summary, and the shipped model's latency on that same device (from
    the profile stage's device runs) so that the prediction error is the table device's own."""
    if not ctx.has(LATENCY_TABLE):
        return None
    r = ctx.get(LATENCY_TABLE)
    ship = ctx.target.quantize.plan_precision
    res = (((devices or {}).get(r.measured_on) or {}).get("results") or {}).get(ship) or {}
    return {"where": r.where(), "measured_on": r.measured_on, "fingerprint": r.fingerprint,
            "fingerprint_text": r.fingerprint_text, "probes": r.probes, "probes_cached": r.probes_cached,
            "baseline_ms": r.baseline_ms, "devices": r.devices,
            "shipped_ms": (res.get("latency_ms") or {}).get("p50")}  # fmt: skip
