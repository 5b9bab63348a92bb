"""Stage `verify`: every TFLite file run on the test set beside PyTorch: accuracy, top-1 agreement and logit
differences, measured; a file outside the parity tolerances stops the deploy (pipeline/verification.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import write_json_atomic
from pipeline.stages.base import Context, Stage
from pipeline.stages.baseline import BASELINE
from pipeline.stages.convert import CONVERT
from pipeline.stages.convert_baseline import CONVERT_BASELINE
from pipeline.stages.finetune import FINETUNE


@dataclass(frozen=True)
class VerifyResult:
    folder: Path
    pruned: Mapping[str, Any]  # VerifyReport.to_dict() of the pruned model's files
    baseline: Mapping[str, Any]  # ... of the unpruned model's file

    def by_precision(self, which: str) -> dict[str, Mapping[str, Any]]:
        report = self.pruned if which == "pruned" else self.baseline
        return {r["precision"]: r for r in report["precisions"]}

    def to_json(self) -> dict[str, Any]:
        return {"pruned": dict(self.pruned), "baseline": dict(self.baseline)}

    @classmethod
    def from_json(cls, folder: Path, figures: Mapping[str, Any]) -> VerifyResult:
        return cls(folder, figures["pruned"], figures["baseline"])


def tflite_files(ctx: Context) -> dict[str, Path]:
    """The files verified and profiled: the pruned model in every precision, and the unpruned one shipped
    (`baseline`; under `ship: auto` the unpruned model in every precision: `baseline`, `baseline-<precision>`)."""
    conv, base, q = ctx.get(CONVERT), ctx.get(CONVERT_BASELINE), ctx.target.quantize
    files = {p: conv.tflite(p) for p in conv.precisions}
    files["baseline"] = base.tflite(q.plan_precision)
    for p in q.baseline_precisions:
        if p != q.plan_precision:
            files[baseline_label(p, q.plan_precision)] = base.tflite(p)
    return files


def baseline_label(precision: str, plan_precision: str) -> str:
    """The profile/verify label of the unpruned model in `precision`."""
    return "baseline" if precision == plan_precision else f"baseline-{precision}"


class VerifyStage(Stage[VerifyResult]):
    name = "verify"
    result = VerifyResult

    def inputs(self, ctx: Context) -> Mapping[str, Path]:
        return {**tflite_files(ctx), "model": ctx.get(FINETUNE).model_path}

    def config(self, ctx: Context) -> Mapping[str, Any]:
        return ctx.test_config()

    def run(self, ctx: Context, out: Path) -> VerifyResult:
        from pipeline.verification import check_parity, verify_tflite

        reports = {}
        for label, conv, model in (("pruned", CONVERT, FINETUNE), ("baseline", CONVERT_BASELINE, BASELINE)):
            report = verify_tflite(ctx.get(conv).files(), ctx.load(ctx.get(model).model_path), ctx.spec,
                                   ctx.data.test, threads=ctx.target.profiling.threads)  # fmt: skip
            reports[label] = report.to_dict()
            check_parity(report, **_tolerances(ctx, label))
        write_json_atomic(out / "verify.json", reports)
        return VerifyResult(out, reports["pruned"], reports["baseline"])


def _tolerances(ctx: Context, label: str) -> dict[str, Mapping[str, float]]:
    """The parity floors. With the int8 remedies active, none for int8 where the remedies decide: the pruned
    int8 file that fell short of `quantize.min_agreement` stops the deploy as a budget (exit 3,
    pipeline/quantize/budget.py) once the report names the ops holding it back, and the unpruned model's
    plain int8 file is the measured "before" (it got no remedies), not a reason to stop."""
    from pipeline.verification import DEFAULT_MAX_REL_DIFF, DEFAULT_MIN_AGREEMENT

    q = getattr(ctx.get(CONVERT), "quantization", None)
    if not q or (label == "pruned" and q.get("met", True)):
        return {"min_agreement": DEFAULT_MIN_AGREEMENT, "max_abs_diff": DEFAULT_MAX_REL_DIFF}
    drop = lambda m: {k: v for k, v in m.items() if k != "int8"}  # noqa: E731
    return {"min_agreement": drop(DEFAULT_MIN_AGREEMENT), "max_abs_diff": drop(DEFAULT_MAX_REL_DIFF)}


VERIFY = VerifyStage()
