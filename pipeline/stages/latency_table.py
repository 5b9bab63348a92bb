"""Stage `latency_table`: the measured per-layer latency table of this model on this runtime (only when the
profile prunes to a latency budget: `pruning.target: {metric: latency}`)."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.bench import host_cores
from pipeline.stages.base import Context, FlatResult, Stage
from pipeline.stages.baseline import BASELINE

TABLE_FILE = "table.json"


@dataclass(frozen=True)
class LatencyTableResult(FlatResult):
    geometries: int
    probes: int
    runtime: str
    machine: str
    threads: int

    @property
    def table_path(self) -> Path:
        return self.folder / TABLE_FILE


def runtime_versions() -> dict[str, str]:
    """The TFLite runtimes installed here: a table measured under other versions is measured again."""
    found = {}
    for dist in ("ai-edge-litert", "tflite-runtime", "tensorflow"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def _threads(ctx: Context) -> int:
    return min(ctx.target.profiling.threads, host_cores())


class LatencyTableStage(Stage[LatencyTableResult]):
    name = "latency_table"
    result = LatencyTableResult

    def applies(self, ctx: Context) -> bool:
        p = ctx.target.pruning
        return p.enabled and p.target.metric == "latency"

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"model": ctx.get(BASELINE).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        t, p = ctx.target, ctx.target.pruning
        return {"precision": t.quantize.plan_precision, "threads": _threads(ctx), "multiple": p.channel_multiple,
                "max_ratio": p.max_layer_ratio, "max_points": p.target.max_points, "keep_layers": p.keep_layers,
                "host": platform.node(), "runtime": runtime_versions(), "format": "edgeship-latency/1"}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> LatencyTableResult:
        from pipeline.latency.layers import prunable_layers
        from pipeline.latency.table import measure_table
        from pipeline.pruning.channels import ignored_layers, prunable_groups

        p, threads = ctx.target.pruning, _threads(ctx)
        model, ex = ctx.load(ctx.get(BASELINE).model_path), ctx.example()
        groups = prunable_groups(model, ex, keep_layers=p.keep_layers)
        layers = prunable_layers(model, ex, ignored=ignored_layers(model, ex, p.keep_layers))
        table = measure_table(layers, groups, precision=ctx.target.quantize.plan_precision, threads=threads,
                              multiple=p.channel_multiple, max_ratio=p.max_layer_ratio,
                              max_points=p.target.max_points, work_dir=out)  # fmt: skip
        table.save(out / TABLE_FILE)
        probes = sum(len(row) for e in table.entries.values() for row in e["ms"])
        runtime = f"{table.runtime} {table.runtime_version}"
        return LatencyTableResult(out, len(table.entries), probes, runtime, table.machine, threads)


LATENCY_TABLE = LatencyTableStage()
