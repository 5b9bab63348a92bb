"""Per-target latency tables: measured latency of each prunable layer as a function of its channel counts.

Latency is a staircase in channels (kernels work in blocks), so the table is measured on the grid of channel
counts the pruner may choose (multiples of the profile's channel multiple), not fitted by a smooth curve.
Where a layer has more candidate counts than `max_points` per axis, a subset is measured and the rest is
interpolated (and the table says so). Stored as versioned JSON per target, model, runtime and threads; a
table measured under another runtime version or thread count is not reused.

Prediction for a pruned model = sum of its layers' table entries x a calibration scale, set once as
measured(unpruned model) / sum(table at full width). The ops the table does not probe (padding, adds,
activations, pooling) work on the same activations as the probed layers and shrink with them, so they are
carried as a share of the layer time rather than a constant: a constant remainder over-predicted pruned
EfficientNet-Lite0 by ~40% (its PAD/ADD time falls with the channels) and was 4x less accurate on the
default CNN (BENCHMARKS.md, "Latency-aware pruning"). `remainder_ms` stays for a constant part (0 by default).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import write_json_atomic
from pipeline.bench import RUNNER, parse_runner_output
from pipeline.errors import DeviceError
from pipeline.latency.layers import Geometry, Layer
from pipeline.proc import run_tool

log = logging.getLogger(__name__)

FORMAT = "edgeship-latency/1"


def candidates(total: int, multiple: int, *, floor: int, max_points: int) -> list[int]:
    """Channel counts the pruner may pick for a layer of `total` channels (always including total)."""
    counts = sorted({c for c in range(multiple, total, multiple) if c >= floor} | {total})
    if len(counts) <= max_points:
        return counts
    idx = np.unique(np.round(np.linspace(0, len(counts) - 1, max_points)).astype(int))
    return [counts[i] for i in idx]


@dataclass(frozen=True)
class LatencyTable:
    """{geometry key: {"cin": [...], "cout": [...], "ms": [[...]]}} plus how and where it was measured."""

    precision: str
    threads: int
    runtime: str
    runtime_version: str
    machine: str
    entries: Mapping[str, Mapping[str, Any]]
    remainder_ms: float = 0.0
    scale: float = 1.0  # calibration: measured(unpruned) / sum of its table entries
    device: str = "this machine"  # where the probes were timed (a DEVICE name, or this machine)
    fingerprint: str = ""  # the device fingerprint's cache key (pipeline/latency/cache.py)
    measured_full_ms: float | None = None  # the unpruned model measured on that same device, when known

    def layer_sum(self, layers: Sequence[Layer], plan: Mapping[str, int]) -> float:
        """Sum of the table entries of `layers` at the channel counts of `plan` (uncalibrated)."""
        return sum(self.layer_ms(lay, *lay.channels(plan)) for lay in layers)

    def calibrated(self, layers: Sequence[Layer], groups: Mapping[str, int], measured_full_ms: float) -> LatencyTable:
        """This table scaled so that it predicts the measured latency of the unpruned model (`groups`). A table
        measured on a device carries that device's own figure for the unpruned model, which wins over
        `measured_full_ms` (a figure from another machine would mix two devices' milliseconds)."""
        full = self.measured_full_ms if self.measured_full_ms is not None else measured_full_ms
        return replace(self, scale=full / self.layer_sum(layers, groups), remainder_ms=0.0)

    def layer_ms(self, layer: Layer, cin: int, cout: int) -> float:
        e = self.entries[layer.geometry.key()]
        if layer.geometry.kind == "depthwise":
            return float(np.interp(cout, e["cout"], e["ms"][0]))
        return _bilinear(e["cin"], e["cout"], np.asarray(e["ms"]), cin, cout)

    def predict(self, layers: Sequence[Layer], plan: Mapping[str, int]) -> float:
        return self.remainder_ms + self.scale * self.layer_sum(layers, plan)

    def save(self, path: Path) -> None:
        write_json_atomic(path, {"format": FORMAT, **asdict(self)})

    @staticmethod
    def load(path: Path) -> LatencyTable | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.pop("format", None) != FORMAT:
            return None
        return LatencyTable(**data)


def _bilinear(xs: Sequence[int], ys: Sequence[int], grid: np.ndarray, x: float, y: float) -> float:
    """Interpolate grid[i][j] measured at (xs[i], ys[j]); exact on measured points."""
    rows = np.array([np.interp(y, ys, grid[i]) for i in range(len(xs))])
    return float(np.interp(x, xs, rows))


def _entry_file(key: str, cin: int, cout: int) -> str:
    safe = key.replace(":", "_")
    return f"{safe}__{cin}x{cout}.tflite"


def plan_probes(layers: Sequence[Layer], groups: Mapping[str, int], *, multiple: int, max_ratio: float,
                max_points: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The grid each distinct geometry needs: union of the channel counts its layers may take."""

    def axis(group: str | None, full: int) -> list[int]:
        if group is None or group not in groups:
            return [full]
        floor = max(min(multiple, full), math.ceil(full * (1 - max_ratio)))
        return candidates(full, multiple, floor=floor, max_points=max_points)

    probes: dict[str, dict[str, Any]] = {}
    for lay in layers:
        key = lay.geometry.key()
        p = probes.setdefault(key, {"geometry": lay.geometry, "cin": set(), "cout": set()})
        p["cout"].update(axis(lay.out_group, lay.cout))
        p["cin"].update(p["cout"] if lay.geometry.kind == "depthwise" else axis(lay.in_group, lay.cin))
    return {k: {**v, "cin": sorted(v["cin"]), "cout": sorted(v["cout"])} for k, v in probes.items()}


def probe_entries(probes: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One build spec per probe (pipeline/latency/build_layers.py): every (cin, cout) of every geometry."""
    entries = []
    for key, p in probes.items():
        geo: Geometry = p["geometry"]
        pairs = [(c, c) for c in p["cout"]] if geo.kind == "depthwise" else [
            (ci, co) for ci in p["cin"] for co in p["cout"]]  # fmt: skip
        for ci, co in pairs:
            entries.append({"file": _entry_file(key, ci, co), "geometry": key, "kind": geo.kind, "kernel": geo.kernel,
                            "stride": geo.stride, "padding": geo.padding, "in_hw": geo.in_hw, "cin": ci,
                            "cout": co})  # fmt: skip
    return entries


def table_entries(probes: Mapping[str, Mapping[str, Any]], ms: Mapping[tuple[str, int, int], float]) -> dict[str, Any]:
    """The table's grid per geometry from {(geometry key, cin, cout): p50 ms}."""
    out: dict[str, dict[str, Any]] = {}
    for key, p in probes.items():
        if p["geometry"].kind == "depthwise":
            out[key] = {"cin": p["cout"], "cout": p["cout"], "ms": [[ms[(key, c, c)] for c in p["cout"]]]}
        else:
            grid = [[ms[(key, ci, co)] for co in p["cout"]] for ci in p["cin"]]
            out[key] = {"cin": p["cin"], "cout": p["cout"], "ms": grid}
    return out


def build_probes(entries: Sequence[Mapping[str, Any]], precision: str, probe_dir: Path, *,
                 timeout_s: float = 1800) -> None:  # fmt: skip
    """Write the .tflite probe of every entry into `probe_dir` (with TensorFlow, in a subprocess); files that
    exist already are kept, and nothing is started when all exist."""
    if all((probe_dir / e["file"]).is_file() for e in entries):
        return
    probe_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=probe_dir.parent) as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"precision": precision, "entries": list(entries)}))
        _run([sys.executable, "-m", "pipeline.latency.build_layers", str(spec), str(probe_dir)], timeout_s,
             "building the latency probes")  # fmt: skip


def measure_table(
    layers: Sequence[Layer],
    groups: Mapping[str, int],
    *,
    precision: str,
    threads: int,
    multiple: int,
    max_ratio: float,
    max_points: int = 16,
    min_seconds: float = 0.1,
    timeout_s: float = 1800,
    work_dir: Path | None = None,
) -> LatencyTable:
    """Build every probe with TensorFlow Lite's converter and time them all here, in one process (no cache;
    pipeline/latency/device_table.py times them on a device, through the cache)."""
    probes = plan_probes(layers, groups, multiple=multiple, max_ratio=max_ratio, max_points=max_points)
    entries = probe_entries(probes)
    log.info("latency table: %d probes for %d geometries", len(entries), len(probes))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        probe_dir = Path(tmp) / "probes"
        build_probes(entries, precision, probe_dir, timeout_s=timeout_s)
        out = _run([sys.executable, str(RUNNER), "--many", str(probe_dir), "--threads", str(threads),
                    "--warmup", "10", "--runs", "50", "--min-seconds", str(min_seconds)], timeout_s,
                   "timing the latency probes")  # fmt: skip
    result = parse_runner_output(out, where="this machine", key="results")
    timed = result["results"]
    ms = {(e["geometry"], e["cin"], e["cout"]): timed[e["file"]]["p50"] for e in entries}
    return LatencyTable(
        precision=precision,
        threads=threads,
        runtime=result["runtime"],
        runtime_version=result["runtime_version"],
        machine=result["machine"],
        entries=table_entries(probes, ms),
    )


def _run(argv: list[str], timeout_s: float, what: str) -> str:
    proc = run_tool(argv, timeout_s=timeout_s)
    if proc.timed_out:
        raise DeviceError(f"{what} took over {timeout_s:.0f} s")
    if proc.rc != 0:
        raise DeviceError(f"{what} failed (exit {proc.rc}): {proc.stderr[-1500:]}")
    return proc.stdout
