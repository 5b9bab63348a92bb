"""Stage `export_baseline`: the unpruned model to ONNX, checked against PyTorch (for the before/after table).
`ExportStage` is also the `export` stage of the fine-tuned model (stages/export.py).

For Edge TPU targets both exports first apply the exact rewrites of pipeline/edgetpu/rewrite.py (grouped
convolutions split, ...), each checked numerically; the rewrites and the layers they touched are figures of
the stage (`edgetpu_rewrites`), and the verify stage compares the converted files with the model as it was."""

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
    edgetpu_rewrites: dict[str, Any] | None = None  # RewriteReport.to_dict() for Edge TPU targets

    @property
    def onnx_path(self) -> Path:
        return self.folder / ONNX_FILE


class ExportStage(Stage[ExportResult]):
    """Export the checkpoint of `source` (a stage whose result has a `model_path`) to ONNX and check it."""

    result = ExportResult
    version = 2  # figures: + edgetpu_rewrites

    def __init__(self, name: str, source: Stage[ModelResult]) -> None:
        self.name, self.source = name, source

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"model": ctx.get(self.source).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        return {**ctx.model_config(), "edgetpu_rewrites": ctx.target.hardware.accelerator == "edgetpu"}

    def run(self, ctx: Context, out: Path) -> ExportResult:
        from pipeline.convert.export_onnx import export_onnx
        from pipeline.edgetpu.rewrite import rewrite_for_edgetpu

        model = ctx.load(ctx.get(self.source).model_path)
        rewrites = None
        if ctx.target.hardware.accelerator == "edgetpu":
            model, report = rewrite_for_edgetpu(model, ctx.example())
            rewrites = report.to_dict()
        result = export_onnx(model, ctx.spec, out / ONNX_FILE, check_images=ctx.data.calibration.images[:8])
        return ExportResult(out, result.max_abs_diff, result.opset, result.exporter, rewrites)


EXPORT_BASELINE = ExportStage("export_baseline", BASELINE)
