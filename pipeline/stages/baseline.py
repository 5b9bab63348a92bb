"""Stage `baseline`: the user's model as given, loaded from its checkpoint and measured (MACs, accuracy)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.base import MODEL_FILE, Context, FlatResult, Stage


@dataclass(frozen=True)
class BaselineResult(FlatResult):
    macs: int
    params: int
    accuracy: float | None
    test_images: int
    test_fingerprint: str

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE


class Baseline(Stage[BaselineResult]):
    name = "baseline"
    result = BaselineResult

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"checkpoint": ctx.checkpoint}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        return {**ctx.model_config(), **ctx.test_config()}

    def run(self, ctx: Context, out: Path) -> BaselineResult:
        from pipeline.data.sources import fingerprint
        from pipeline.pruning.channels import count_macs_params
        from pipeline.train.distill import accuracy, predict

        model = ctx.load(ctx.checkpoint)
        macs, params = count_macs_params(model, ctx.example())
        test = ctx.data.test
        acc = accuracy(predict(model, ctx.spec, test), test.labels)
        ctx.save(model, out / MODEL_FILE, {"stage": "baseline", "source": str(ctx.checkpoint)})
        return BaselineResult(out, macs, params, acc, len(test), fingerprint(test))


BASELINE = Baseline()
