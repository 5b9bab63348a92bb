"""Stage `convert`: the pruned, fine-tuned model to TFLite in every precision the profile asks for, with the
quantization remedies (issue 14).

`QuantizeConvertStage` converts like every `ConvertStage`, then, when int8 is among the precisions, measures
the int8 file's top-1 agreement with PyTorch on the validation split and applies the remedies of
pipeline/quantize/remedies.py in order until `quantize.min_agreement` is met. The winner replaces
model_int8.tflite; what each remedy bought, the per-op error and the final figures are the stage's
`quantization` figures (manifest.json, summary.json, the report). Falling short stops the deploy with exit 3
in pipeline/deploy.py (a budget row of the summary), after the report names the ops holding it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stages.base import Context
from pipeline.stages.convert_baseline import ConvertResult, ConvertStage
from pipeline.stages.export import EXPORT
from pipeline.stages.finetune import FINETUNE

if TYPE_CHECKING:
    from pipeline.targets import TargetProfile

QAT_IMAGES = 4000  # training images QAT draws its batches from


@dataclass(frozen=True)
class QuantizedConvertResult(ConvertResult):
    quantization: Mapping[str, Any] | None = None  # remedies.run_remedies' record; None without int8

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "quantization": None if self.quantization is None else dict(self.quantization)}

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> QuantizedConvertResult:
        base = ConvertResult.from_json(folder, figures)
        return cls(base.folder, base.sizes, base.fixes, figures.get("quantization"))


def remedies_apply(ctx: Context, precisions: tuple[str, ...]) -> bool:
    return "int8" in precisions


def full_integer_only(t: TargetProfile) -> bool:
    """Edge TPU targets must stay full-integer: no remedy may keep an op in float there."""
    return t.hardware.accelerator == "edgetpu"


class QuantizeConvertStage(ConvertStage):
    result = QuantizedConvertResult  # type: ignore[assignment]

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {**super().inputs(ctx), "model": ctx.get(FINETUNE).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        q = ctx.target.quantize
        if not remedies_apply(ctx, self.precisions(ctx.target)):
            return super().config(ctx)
        desc = ctx.data.describe()
        return {**super().config(ctx), "min_agreement": q.min_agreement, "remedies": list(q.remedies),
                "max_accuracy_drop": q.max_accuracy_drop,
                "max_float_ops": q.max_float_ops, "qat_steps": q.qat_steps, "remedy_images": q.remedy_images,
                "calibration_ranges": list(q.calibration_ranges),
                "val": desc["val"], "train": desc["train"], "seed": ctx.req.seed, "remedies_version": 3}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> QuantizedConvertResult:
        base = super().run(ctx, out)
        if not remedies_apply(ctx, base.precisions):
            return QuantizedConvertResult(base.folder, base.sizes, base.fixes, None)
        from pipeline.quantize.remedies import run_remedies

        record = run_remedies(self._job(ctx, base), out)
        sizes = {**base.sizes, "int8": (out / "model_int8.tflite").stat().st_size}
        return QuantizedConvertResult(base.folder, sizes, base.fixes, record)

    def _job(self, ctx: Context, base: ConvertResult) -> Any:
        from pipeline.bench import BenchSettings, bench_settings, profile_local
        from pipeline.edgetpu.fixes import edgetpu_fixes
        from pipeline.edgetpu.rewrite import rewrite_for_edgetpu
        from pipeline.quantize.remedies import RemedyJob

        t, q, seed = ctx.target, ctx.target.quantize, ctx.req.seed
        edgetpu = full_integer_only(t)
        model = ctx.load(ctx.get(FINETUNE).model_path)
        if edgetpu:
            model, _ = rewrite_for_edgetpu(model, ctx.example())
        host = bench_settings(t, on_host=True)
        timing = BenchSettings(threads=host.threads, warmup=10, runs=50, min_seconds=0.5)
        return RemedyJob(
            model=model, spec=ctx.spec, onnx=ctx.get(self.export).onnx_path,
            fp32=base.tflite("fp32") if "fp32" in base.sizes else None,
            int8=base.tflite("int8"), saved_model=None, val=ctx.data.val.subset(q.remedy_images, seed=seed),
            calibration=ctx.data.calibration.subset(q.calibration_images, seed=seed),
            extra_calibration=ctx.data.train_sample(3 * q.calibration_images, seed=seed + 7),
            train=ctx.data.train_sample(QAT_IMAGES, seed=seed + 8), min_agreement=q.min_agreement,
            max_accuracy_drop=q.max_accuracy_drop, remedies=tuple(q.remedies), int8_io=q.int8_io,
            full_integer_only=edgetpu, max_float_ops=q.max_float_ops, calibration_ranges=tuple(q.calibration_ranges),
            qat_steps=q.qat_steps, threads=host.threads, seed=seed,
            extra_args=(lambda p: edgetpu_fixes(p).args) if edgetpu else (lambda p: ()),
            timing=lambda p: float(profile_local(p, timing)["latency_ms"]["p50"]),
        )  # fmt: skip


CONVERT = QuantizeConvertStage("convert", EXPORT, lambda t: tuple(t.quantize.precisions))
