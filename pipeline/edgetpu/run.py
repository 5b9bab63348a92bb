"""Edge TPU stage: analyse the full-integer model, compile it when `edgetpu_compiler` is installed.

Writes into the stage folder: `edgetpu.json` (the analysis with a PyTorch layer per op, the compiler's
result, the conversion fixes applied), `edgetpu.md` (the same as a table for the report) and, when the
compiler ran and succeeded, `model_edgetpu.tflite` plus its log. Without the compiler, the result says so
plainly and the int8 model is shipped with the analysis.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.artifacts import write_json_atomic, write_text_atomic
from pipeline.edgetpu.analyze import CPU, CompatReport, analyze
from pipeline.edgetpu.attribution import LayerRef, attribute_ops, matched_share
from pipeline.edgetpu.budget import feedback_lines
from pipeline.edgetpu.compiler import run_compiler

log = logging.getLogger(__name__)


def _layer_feedback(report: CompatReport, refs: list[LayerRef]) -> list[dict[str, Any]]:
    """For the first op that falls back and every op that breaks a rule: the PyTorch layer and what to change."""
    by_index = {r.op_index: r for r in refs}
    rows = []
    failing = [o for o in report.ops if o.placement == CPU or o.index in report.also_failing]
    for o in failing:
        ref = by_index.get(o.index)
        changes = list(dict.fromkeys(i.hint for i in o.issues if i.severity == "error" and i.hint))
        rows.append(
            {
                "op_index": o.index,
                "op": o.op,
                "layer": ref.layer if ref else None,
                "layer_type": ref.layer_type if ref else None,
                "where": ref.describe() if ref else "no PyTorch layer found for it",
                "reason": o.reason,
                "what_to_change": changes,
            }
        )
    return rows


def run_edgetpu_stage(
    tflite: Path,
    model: nn.Module,
    example: torch.Tensor,
    out: Path,
    *,
    sram_mb: float,
    fixes: Mapping[str, Any],
    rewrites: Mapping[str, Any] | None = None,
    compile_timeout_s: float = 300,
) -> dict[str, Any]:
    """Analyse `tflite` (full int8) for the Edge TPU, run the compiler if present; files into `out`.

    `model` is the PyTorch model `tflite` was converted from (after the rewrites of pipeline.edgetpu.rewrite,
    whose `RewriteReport.to_dict()` is `rewrites`: recorded with the figures)."""
    compiler = run_compiler(tflite, out / "compiler", timeout_s=compile_timeout_s)
    if compiler.available and not compiler.ok:
        compiler.raise_for_status()
    report = analyze(tflite, sram_mb=sram_mb, compiler=compiler)
    refs = attribute_ops(tflite, model, example)
    feedback = _layer_feedback(report, refs)
    data = report.to_dict()
    for op, ref in zip(data["ops"], refs, strict=True):
        op["pytorch_layer"] = ref.layer
        op["pytorch_layer_how"] = ref.how
    shipped_edgetpu = None
    if compiler.ok and compiler.edgetpu_model is not None:
        shipped_edgetpu = out / "model_edgetpu.tflite"
        shutil.copyfile(compiler.edgetpu_model, shipped_edgetpu)
    fb = data["first_fallback"]
    if fb is not None:
        ref = refs[fb["op_index"]]
        fb["pytorch_layer"] = ref.layer
        fb["where"] = ref.describe()
    summary = {
        "status": report.status,
        "fully_mapped": report.fully_mapped,
        "tpu_ops": report.tpu_ops,
        "cpu_ops": report.cpu_ops,
        "first_fallback": fb,
        "blockers": data["blockers"],
        "memory": data["memory"],
        "layer_feedback": feedback,
        "attribution_exact_share": round(matched_share(refs), 3),
        "fixes": dict(fixes),
        "rewrites": dict(rewrites) if rewrites is not None else None,
        "compiler": {
            "available": compiler.available,
            "ok": compiler.ok,
            "message": compiler.message,
            "returncode": compiler.returncode,
            "on_chip_bytes": compiler.on_chip_bytes,
            "off_chip_bytes": compiler.off_chip_bytes,
            "subgraphs": compiler.subgraphs,
        },
        "edgetpu_model": shipped_edgetpu.name if shipped_edgetpu else None,
        "sram_mb": sram_mb,
    }
    write_json_atomic(out / "edgetpu.json", {**summary, "analysis": data})
    write_text_atomic(out / "edgetpu.md", render_markdown(summary, report, data["ops"]))
    log.info(
        "Edge TPU: %s (%d of %d ops on the TPU); edgetpu_compiler %s",
        report.status,
        report.tpu_ops,
        len(report.ops),
        "compiled the model" if compiler.ok else "not installed" if not compiler.available else "failed",
    )
    return summary


def render_markdown(summary: Mapping[str, Any], report: CompatReport, ops: list[Mapping[str, Any]]) -> str:
    """What the pipeline fixed, what the user should change (with the PyTorch layer), the op table, memory and
    the compiler's result."""
    from pipeline.edgetpu.analyze import format_bytes

    lines = [f"- Fixed during conversion: {note}." for note in summary["fixes"].get("notes", [])]
    lines += [f"- {line}" for line in feedback_lines(summary)]
    mem = summary["memory"]
    lines += [
        f"- Parameters: {format_bytes(mem['param_bytes_tpu'])} of {format_bytes(mem['param_bytes_total'])} on the "
        f"Edge TPU; {format_bytes(mem['on_chip_bytes'])} cached in its {format_bytes(mem['sram_bytes'])} on-chip "
        f"memory, {format_bytes(mem['off_chip_bytes'])} streamed from off-chip memory on every inference.",
        "",
        "| # | op | version | input dtypes | quantization | on the TPU | PyTorch layer | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    where = {"tpu": "yes", "cpu": "**no**", "cpu-after-fallback": "no (after fallback)", "cpu-edge": "CPU (I/O)"}
    for o in ops:
        layer = o.get("pytorch_layer") or "-"
        if layer != "-" and str(o.get("pytorch_layer_how", "")).startswith("after"):
            layer = f"after `{layer}`"
        elif layer != "-":
            layer = f"`{layer}`"
        lines.append(
            f"| {o['index']} | {o['op']} | {o['version']} | {', '.join(o['input_dtypes'])} | {o['quantization']} "
            f"| {where.get(o['placement'], o['placement'])} | {layer} | {o['reason'].replace('|', '/')} |"
        )
    md = report.to_markdown()
    compiler_part = md[md.index("### edgetpu_compiler") :] if "### edgetpu_compiler" in md else ""
    return "\n".join(lines) + "\n\n" + compiler_part
