"""Stage `convert_baseline`: the unpruned model to TFLite in the shipped precision (every precision under
`quantize.ship: auto`), for the before/after table. `ConvertStage` is also the `convert` stage of the
fine-tuned model (stages/convert.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.convert.convert_tflite import tflite_name
from pipeline.stages.base import Context, Stage
from pipeline.stages.export_baseline import EXPORT_BASELINE, ExportResult

if TYPE_CHECKING:
    from pipeline.convert.convert_tflite import TfliteFile
    from pipeline.targets import TargetProfile


@dataclass(frozen=True)
class ConvertResult:
    folder: Path
    sizes: Mapping[str, int]  # precision -> bytes, in the order converted
    fixes: Mapping[str, Any]  # onnx2tf options applied for the target's accelerator (ConversionFixes.to_dict)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    def tflite(self, precision: str) -> Path:
        return self.folder / tflite_name(precision)

    def files(self) -> dict[str, TfliteFile]:
        from pipeline.convert.convert_tflite import describe_tflite

        return {p: describe_tflite(p, self.tflite(p)) for p in self.sizes}

    def to_json(self) -> dict[str, Any]:
        return {"files": {p: {"file": tflite_name(p), "size_bytes": n} for p, n in self.sizes.items()},
                "fixes": dict(self.fixes)}  # fmt: skip

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> ConvertResult:
        sizes = {p: int(v["size_bytes"]) for p, v in figures["files"].items()}
        return cls(folder, sizes, figures.get("fixes", {}))


class ConvertStage(Stage[ConvertResult]):
    """Convert the ONNX file of `export` with onnx2tf to the precisions `precisions(target)` asks for."""

    result = ConvertResult
    version = 2  # figures: {"files": {precision: ...}, "fixes": ...}

    def __init__(
        self, name: str, export: Stage[ExportResult], precisions: Callable[[TargetProfile], tuple[str, ...]]
    ) -> None:
        self.name, self.export, self.precisions = name, export, precisions

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"onnx": ctx.get(self.export).onnx_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        t = ctx.target
        return {"precisions": self.precisions(t), "int8_io": t.quantize.int8_io,
                "calibration": ctx.data.describe()["calibration"], "n": t.quantize.calibration_images,
                "accelerator": t.hardware.accelerator}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> ConvertResult:
        from pipeline.convert.convert_tflite import convert_tflite
        from pipeline.convert.export_onnx import OnnxExport
        from pipeline.edgetpu.fixes import ConversionFixes, edgetpu_fixes
        from pipeline.edgetpu.rewrite import suggestions_text
        from pipeline.errors import ConversionError

        t, onnx_path = ctx.target, ctx.get(self.export).onnx_path
        precisions = self.precisions(t)
        fixes = edgetpu_fixes(onnx_path) if t.hardware.accelerator == "edgetpu" else ConversionFixes((), ())
        calib = ctx.data.calibration.subset(t.quantize.calibration_images, seed=ctx.req.seed)
        try:
            files = convert_tflite(
                OnnxExport.from_path(onnx_path), ctx.spec, out, precisions=precisions,
                calibration=calib if "int8" in precisions else None, int8_io=t.quantize.int8_io,
                log_path=out / "onnx2tf.log", extra_args=fixes.args,
            )  # fmt: skip
        except ConversionError as exc:  # name the layers the Edge TPU rewrites had to leave (nn.GELU, ...)
            raise ConversionError(f"{exc}{suggestions_text(ctx.get(self.export).edgetpu_rewrites)}") from exc
        return ConvertResult(out, {p: f.size_bytes for p, f in files.items()}, fixes.to_dict())


CONVERT_BASELINE = ConvertStage("convert_baseline", EXPORT_BASELINE, lambda t: t.quantize.baseline_precisions)
