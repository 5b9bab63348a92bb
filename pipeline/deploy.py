"""The deploy chain for one target: walk the declared stages (pipeline.stages.CHAIN), then report and publish.

baseline -> export_baseline -> convert_baseline -> latency_table -> sensitivity -> prune -> finetune -> export
-> convert -> edgetpu -> verify -> profile, then the summary and reports (pipeline/report) and the bundle
(pipeline/bundle.py). A stage that does not apply to the target (latency_table without a latency budget,
edgetpu without an Edge TPU) is left out. Every stage is cached under runs/<target>/<stage>/ (runner.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.artifacts import run_lock
from pipeline.edgetpu.budget import ROW_NAME, edgetpu_hint
from pipeline.errors import BudgetError, CheckpointError
from pipeline.quantize.budget import ROW_NAME as QUANT_ROW
from pipeline.quantize.budget import quant_hint
from pipeline.request import DeployRequest, DeployResult, Progress
from pipeline.runner import run_stage
from pipeline.stages import CHAIN, Context, Stage
from pipeline.targets import TargetProfile

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def deploy(req: DeployRequest, on_stage: Progress | None = None) -> DeployResult:
    with run_lock(req.run_dir):
        return _deploy_locked(req, on_stage or (lambda name, rec: None))


def _checkpoint(req: DeployRequest) -> Path:
    spec = req.spec
    checkpoint = req.checkpoint or (REPO / spec.default_checkpoint if spec.default_checkpoint else None)
    if checkpoint is None:
        raise CheckpointError(f"model {spec.name} has no default checkpoint; give --checkpoint PATH")
    if not checkpoint.is_file():
        raise CheckpointError(
            f"{checkpoint}: no such checkpoint file; train one with `make baseline` or give --checkpoint PATH"
        )
    return checkpoint


def run_chain(ctx: Context, on_stage: Progress, stages: tuple[Stage, ...] = CHAIN) -> None:
    """Run (or skip when fresh) every stage that applies, in order; each result lands in `ctx`."""
    for stage in stages:
        if not stage.applies(ctx):
            continue
        config = {**stage.config(ctx), "stage_version": stage.version}
        rec = run_stage(ctx.run_dir, stage.name, lambda out, s=stage: s.run(ctx, out).to_json(),
                        inputs=stage.inputs(ctx), config=config, force=ctx.req.force)  # fmt: skip
        ctx.results[stage.name] = stage.result.from_json(rec.folder, rec.figures)
        ctx.records[stage.name] = rec
        on_stage(stage.name, rec)


def _deploy_locked(req: DeployRequest, on_stage: Progress) -> DeployResult:
    from pipeline.bundle import publish
    from pipeline.report import write_report
    from pipeline.report.summary import summarize

    ctx = Context(req, _checkpoint(req))
    run_chain(ctx, on_stage)
    summary = summarize(ctx)
    files = write_report(summary, req.run_dir, save_summary=True)
    misses = [b for b in summary["budgets"] if b["status"] == "missed"]
    if misses and not req.allow_budget_miss:
        lines = "; ".join(f"{b['name']}: {b['value']} vs limit {b['limit']}" for b in misses)
        raise BudgetError(
            f"target {req.target.name}: the result misses its budget ({lines}). Nothing was published to "
            f"{req.bundle_dir}; see {files.markdown}. {budget_hint(req.target, misses, summary)}"
            " Or pass --allow-budget-miss to ship it anyway."
        )
    bundle_dir = publish(ctx, summary, report_dir=req.run_dir)
    return DeployResult(bundle_dir, bundle_dir / "report.md", summary)


def budget_hint(t: TargetProfile, misses: list[dict[str, Any]], summary: Mapping[str, Any]) -> str:
    """What to change, per missed budget and pruning mode."""
    hints = []
    names = {b["name"] for b in misses}
    if "accuracy drop" in names:
        hints.append(
            "For accuracy: prune less, fine-tune longer (finetune.epochs) or allow more budgets.max_accuracy_drop."
        )
    if "size (KiB)" in names:
        ship_int8 = "" if t.quantize.ship == "int8" else " or ship int8 (quantize.ship: int8)"
        hints.append(f"For size: prune more (a lower pruning.target.keep){ship_int8}.")
    if "latency p50 (ms)" in names:
        lm = summary.get("latency_model")
        if lm:
            hints.append(
                f"For latency: the table predicted {lm['predicted_ms']:.4g} ms and {lm['measured_ms']:.4g} ms was "
                f"measured ({lm['error_pct']:+.1f}% error): set budgets.latency_ms about {abs(lm['error_pct']):.0f}% "
                "lower to leave that margin, or raise pruning.target.max_points for a finer table."
            )
        else:
            hints.append("For latency: prune to it directly with pruning.target: {metric: latency}.")
    if ROW_NAME in names:
        hints.append(edgetpu_hint(summary.get("edgetpu")))
    if QUANT_ROW in names:
        hints.append(quant_hint(summary.get("quantization")))
    return " ".join(hints)
