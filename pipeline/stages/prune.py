"""Stage `prune`: structured channel pruning to the profile's MAC/parameter target, or to its latency budget
through the measured table (pipeline/pruning)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.base import MODEL_FILE, Context, Stage
from pipeline.stages.baseline import BASELINE
from pipeline.stages.convert_baseline import CONVERT_BASELINE
from pipeline.stages.latency_table import LATENCY_TABLE


@dataclass(frozen=True)
class PruneOutcome:
    folder: Path
    enabled: bool
    pruning: Mapping[str, Any] | None = None  # PruneResult.figures(): metric, keep_target/achieved, layers...
    latency: Mapping[str, Any] | None = None  # latency-aware pruning: budget, prediction, plan
    accuracy_before_finetune: float | None = None

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    def figure(self, key: str) -> Any:
        return (self.pruning or {}).get(key)

    @property
    def layers(self) -> list[Mapping[str, Any]]:
        return list(self.figure("layers") or [])

    def to_json(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False}
        extra = {"latency": dict(self.latency)} if self.latency is not None else {}
        return {"enabled": True, **dict(self.pruning or {}), **extra,
                "accuracy_before_finetune": self.accuracy_before_finetune}  # fmt: skip

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> PruneOutcome:
        if not figures.get("enabled"):
            return cls(folder, False)
        rest = {k: v for k, v in figures.items() if k not in ("enabled", "latency", "accuracy_before_finetune")}
        return cls(folder, True, rest, figures.get("latency"), figures.get("accuracy_before_finetune"))


class PruneStage(Stage[PruneOutcome]):
    name = "prune"
    result = PruneOutcome

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        out = {"model": ctx.get(BASELINE).model_path}
        if ctx.has(LATENCY_TABLE):
            base_tflite = ctx.get(CONVERT_BASELINE).tflite(ctx.target.quantize.ship)
            out |= {"table": ctx.get(LATENCY_TABLE).table_path, "baseline": base_tflite}
        return out

    def config(self, ctx: Context) -> Mapping[str, Any]:
        t = ctx.target
        return {**t.pruning.model_dump(mode="json"), **ctx.test_config(), "budget_ms": t.budgets.latency_ms}

    def run(self, ctx: Context, out: Path) -> PruneOutcome:
        from pipeline.train.distill import accuracy, predict

        model = ctx.load(ctx.get(BASELINE).model_path)
        if not ctx.target.pruning.enabled:
            ctx.save(model, out / MODEL_FILE, {"stage": "prune", "pruned": False})
            return PruneOutcome(out, False)
        result, latency = self._prune(ctx, model)
        test = ctx.data.test
        acc = accuracy(predict(result.model, ctx.spec, test), test.labels)
        ctx.save(result.model, out / MODEL_FILE, {"stage": "prune", **result.figures()})
        return PruneOutcome(out, True, result.figures(), latency, acc)

    @staticmethod
    def _prune(ctx: Context, model: Any) -> tuple[Any, Mapping[str, Any] | None]:
        t = ctx.target
        if not ctx.has(LATENCY_TABLE):
            from pipeline.pruning.channels import prune_to_target

            return prune_to_target(model, ctx.example(), t.pruning), None
        from pipeline.bench import bench_settings, profile_local
        from pipeline.latency.table import LatencyTable
        from pipeline.pruning.latency import prune_to_latency

        base_tflite = ctx.get(CONVERT_BASELINE).tflite(t.quantize.ship)
        measured = profile_local(base_tflite, bench_settings(t, on_host=True))["latency_ms"]["p50"]
        table = LatencyTable.load(ctx.get(LATENCY_TABLE).table_path)
        lp = prune_to_latency(model, ctx.example(), table, t.pruning, budget_ms=t.budgets.latency_ms,
                              measured_full_ms=measured)  # fmt: skip
        return lp.result, lp.figures


PRUNE = PruneStage()
