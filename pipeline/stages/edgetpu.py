"""Stage `edgetpu` (Edge TPU targets only): the shipped int8 model analysed op by op against the Edge TPU's
rules, with the PyTorch layer behind each op, and compiled with edgetpu_compiler when it is installed."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stages.base import Context, Stage
from pipeline.stages.convert import CONVERT
from pipeline.stages.export import EXPORT
from pipeline.stages.finetune import FINETUNE


@dataclass(frozen=True)
class EdgetpuResult:
    folder: Path
    figures: Mapping[str, Any]  # status, tpu_ops, cpu_ops, blockers, layer_feedback, compiler, ...

    @property
    def json_path(self) -> Path:
        return self.folder / "edgetpu.json"

    @property
    def markdown_path(self) -> Path:
        return self.folder / "edgetpu.md"

    @property
    def compiled_model(self) -> Path | None:
        name = self.figures.get("edgetpu_model")
        return self.folder / name if name else None

    def to_json(self) -> dict[str, Any]:
        return dict(self.figures)

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> EdgetpuResult:
        return cls(folder, dict(figures))


class EdgetpuStage(Stage[EdgetpuResult]):
    name = "edgetpu"
    result = EdgetpuResult
    version = 2  # figures: + rewrites (the export stage's Edge TPU rewrites)

    def applies(self, ctx: Context) -> bool:
        return ctx.target.hardware.accelerator == "edgetpu"

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {"tflite": ctx.get(CONVERT).tflite(ctx.target.quantize.ship), "model": ctx.get(FINETUNE).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        return {"sram_mb": ctx.target.hardware.edgetpu_sram_mb,
                "compiler": shutil.which("edgetpu_compiler") or "absent", "format": "edgeship-edgetpu/1"}  # fmt: skip

    def run(self, ctx: Context, out: Path) -> EdgetpuResult:
        from pipeline.edgetpu.rewrite import rewrite_for_edgetpu
        from pipeline.edgetpu.run import run_edgetpu_stage

        conv, rewrites = ctx.get(CONVERT), ctx.get(EXPORT).edgetpu_rewrites
        model = ctx.load(ctx.get(FINETUNE).model_path)
        if rewrites is not None:  # the layers as exported, so that each op is attributed to its own layer
            model, _ = rewrite_for_edgetpu(model, ctx.example())
        figures = run_edgetpu_stage(
            conv.tflite(ctx.target.quantize.ship), model, ctx.example(), out,
            sram_mb=ctx.target.hardware.edgetpu_sram_mb or 8.0, fixes=conv.fixes, rewrites=rewrites,
        )  # fmt: skip
        return EdgetpuResult(out, figures)


EDGETPU = EdgetpuStage()
