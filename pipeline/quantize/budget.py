"""int8 agreement as a budget: the row of a target that ships int8, and what the deploy says on a miss.

The row is missed when the int8 model the remedies ended with agrees with PyTorch's top-1 on fewer than
`quantize.min_agreement` of the validation images; a second row, when `quantize.max_accuracy_drop` is set, is
missed when its validation accuracy sits further than that below the float model's. A miss stops the deploy
like every budget (exit 3, nothing published) unless `--allow-budget-miss` ships it labelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROW_NAME = "int8 agreement (val)"
DROP_ROW = "int8 accuracy drop (val)"


def drop_within(drop: float, limit: float) -> bool:
    """A float-minus-int8 accuracy drop within `quantize.max_accuracy_drop` (rounding slack 1e-9)."""
    return drop <= limit + 1e-9


def quant_budget_rows(quantization: Mapping[str, Any] | None, shipped: str) -> list[dict[str, Any]]:
    """The row for the convert stage's `quantization` record; none when int8 is not shipped."""
    if not quantization or shipped != "int8":
        return []
    value, limit = float(quantization["agreement"]), float(quantization["min_agreement"])
    note = (f"at least; top-1 vs PyTorch on {quantization['val_images']} validation images after "
            f"{quantization['shipped']}")  # fmt: skip
    rows = [{"name": ROW_NAME, "limit": limit, "value": round(value, 4),
             "status": "met" if value >= limit else "missed", "note": note}]  # fmt: skip
    max_drop, drop = quantization.get("max_accuracy_drop"), quantization.get("accuracy_drop")
    if max_drop is not None and drop is not None:
        rows.append({"name": DROP_ROW, "limit": float(max_drop), "value": round(float(drop), 4),
                     "status": "met" if drop_within(float(drop), float(max_drop)) else "missed",
                     "note": f"at most; float minus int8 validation accuracy on {quantization['val_images']} "
                             f"validation images after {quantization['shipped']}"})  # fmt: skip
    return rows


def quant_hint(quantization: Mapping[str, Any] | None) -> str:
    """For a missed int8 agreement: the ops holding it back and what to change (remedies.advice)."""
    if not quantization:
        return ""
    return str(quantization.get("advice") or "")
