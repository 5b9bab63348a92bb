"""Being on the Edge TPU as a budget: the budget row of an Edge TPU target and what the deploy says on a miss.

The row is missed when edgetpu_compiler 16 would refuse the model (the analysis' blockers: op versions it
cannot parse) or when the share of ops the analysis maps to the Edge TPU is below
`budgets.edgetpu_min_mapped`. Without that field only a refusal misses. A miss stops the deploy like every
budget (exit 3, nothing published) unless `--allow-budget-miss` ships it labelled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

ROW_NAME = "Edge TPU ops mapped"


def feedback_lines(summary: Mapping[str, Any]) -> list[str]:
    """What keeps the model off the Edge TPU, one sentence each: the op, its PyTorch layer, the reason and the
    fix, then every blocker that makes compiler 16 refuse the whole model (the report and the budget error)."""
    lines = []
    for row in summary.get("layer_feedback") or []:
        change = "; ".join(row["what_to_change"]) or "see the Edge TPU table of the report"
        lines.append(f"Op #{row['op_index']} {row['op']} comes from {row['where']}: {row['reason']}. To fix: {change}.")
    for b in summary.get("blockers") or []:
        lines.append(f"Blocks compilation: {b['message']} To fix: {b['hint']}.")
    return lines


def mapped_share(edgetpu: Mapping[str, Any]) -> float:
    """Share of the analysed ops that run on the Edge TPU (0 for a model with no ops)."""
    tpu, cpu = int(edgetpu["tpu_ops"]), int(edgetpu["cpu_ops"])
    return tpu / (tpu + cpu) if tpu + cpu else 0.0


def edgetpu_budget_rows(budgets: Any, edgetpu: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The budget row for the Edge TPU stage's figures (`summary["edgetpu"]`); none without the stage."""
    if not edgetpu:
        return []
    limit = budgets.edgetpu_min_mapped
    share, refused = mapped_share(edgetpu), bool(edgetpu.get("blockers"))
    tpu, total = int(edgetpu["tpu_ops"]), int(edgetpu["tpu_ops"]) + int(edgetpu["cpu_ops"])
    note = [f"{tpu} of {total} ops on the Edge TPU (analysis of the shipped .tflite)"]
    if refused:
        note.append("edgetpu_compiler 16 refuses the model: " + "; ".join(b["message"] for b in edgetpu["blockers"]))
    fb = edgetpu.get("first_fallback")
    if fb:
        where = f" ({fb['where']})" if fb.get("where") else ""
        note.append(f"falls back at op #{fb['op_index']} {fb['op']}{where}")
    if limit is None:
        note.append("budgets.edgetpu_min_mapped not set: only a compiler refusal misses")
    missed = refused or (limit is not None and share < limit)
    return [{"name": ROW_NAME, "limit": limit if limit is not None else 0.0, "value": math.floor(share * 1000) / 1000,
             "status": "missed" if missed else "met", "note": "; ".join(note)}]  # fmt: skip


def edgetpu_hint(edgetpu: Mapping[str, Any] | None) -> str:
    """For a missed Edge TPU budget: the blockers, the PyTorch layers and the fixes (as the report words them),
    what the pipeline rewrote itself and what it left as a suggestion."""
    if not edgetpu:
        return ""
    parts = [f"For the Edge TPU ({edgetpu['status']}):", *feedback_lines(edgetpu)]
    rewrites = edgetpu.get("rewrites") or {}
    done = rewrites.get("applied") or []
    if done:
        layers = "; ".join(f"`{r['layer']}` ({r['kind']})" for r in done)
        parts.append(f"Already rewritten before export: {layers}.")
    for s in rewrites.get("suggestions") or []:
        parts.append(f"Not rewritten automatically (it would change the numbers): `{s['layer']}` ({s['layer_type']}): "
                     f"{s['what_to_change']}.")  # fmt: skip
    if not edgetpu.get("blockers"):
        parts.append("Or lower budgets.edgetpu_min_mapped to ship a partly mapped model.")
    return " ".join(parts)
