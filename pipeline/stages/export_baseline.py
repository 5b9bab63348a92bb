"""Stage `export_baseline`: the unpruned model to ONNX, checked against PyTorch (for the before/after table).
`ExportStage` is also the `export` stage of the fine-tuned model (stages/export.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.base import Context, FlatResult, ModelResult, Stage
from pipeline.stages.baseline import BASELINE

ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportResult(FlatResult):
    max_abs_diff_vs_torch: float
    opset: int
    exporter: str

    @property
    def onnx_path(self) -> Path:
        return self.folder / ONNX_FILE


class ExportStage(Stage[ExportResult]):
    """Export the checkpoint of `source` (a stage whose result has a `model_path`) to ONNX and check it."""

    result = ExportResult

    def __init__(self, name: str, source: Stage[ModelResult]) -> None:
        self.name, self.source = name, source

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"model": ctx.get(self.source).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        return ctx.model_config()

    def run(self, ctx: Context, out: Path) -> ExportResult:
        from pipeline.convert.export_onnx import export_onnx

        model = ctx.load(ctx.get(self.source).model_path)
        result = export_onnx(model, ctx.spec, out / ONNX_FILE, check_images=ctx.data.calibration.images[:8])
        return ExportResult(out, result.max_abs_diff, result.opset, result.exporter)


EXPORT_BASELINE = ExportStage("export_baseline", BASELINE)
