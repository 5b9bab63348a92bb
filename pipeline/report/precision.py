"""`quantize.ship: auto`: the precision shipped is the fastest one, as measured where the model was profiled,
whose accuracy drop from the unpruned PyTorch model stays within `budgets.max_accuracy_drop`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def choose_precision(
    variants: Mapping[str, Mapping[str, Any]], order: Sequence[str], *, base_acc: float, max_drop: float
) -> tuple[str, dict[str, Any]]:
    """(precision to ship, the choice as the report shows it: every candidate's p50, accuracy and whether it
    meets the accuracy budget). With none within the budget the most accurate ships, and the accuracy budget
    row then stops the deploy."""
    rows = []
    for p in order:
        v = variants[p]
        acc = v.get("accuracy")
        drop = None if acc is None else base_acc - acc
        rows.append({"precision": p, "p50_ms": v["latency_ms"]["p50"], "accuracy": acc,
                     "accuracy_drop": None if drop is None else round(drop, 6),
                     "within_budget": drop is not None and drop <= max_drop})  # fmt: skip
    ok = [r for r in rows if r["within_budget"]]
    if ok:
        best = min(ok, key=lambda r: (r["p50_ms"], order.index(r["precision"])))
        why = f"fastest within the {max_drop:.2%} accuracy budget, measured"
    else:
        best = max(rows, key=lambda r: (r["accuracy"] or 0.0, -r["p50_ms"]))
        why = f"no precision is within the {max_drop:.2%} accuracy budget: the most accurate"
    return best["precision"], {"mode": "auto", "chosen": best["precision"], "why": why, "candidates": rows}
