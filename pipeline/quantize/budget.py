"""int8 agreement as a budget: the row of a target that ships int8, and what the deploy says on a miss.

The row is missed when the int8 model the remedies ended with agrees with PyTorch's top-1 on fewer than
`quantize.min_agreement` of the validation images. A miss stops the deploy like every budget (exit 3,
nothing published) unless `--allow-budget-miss` ships it labelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROW_NAME = "int8 agreement (val)"


def quant_budget_rows(quantization: Mapping[str, Any] | None, shipped: str) -> list[dict[str, Any]]:
    """The row for the convert stage's `quantization` record; none when int8 is not shipped."""
    if not quantization or shipped != "int8":
        return []
    value, limit = float(quantization["agreement"]), float(quantization["min_agreement"])
    note = (f"at least; top-1 vs PyTorch on {quantization['val_images']} validation images after "
            f"{quantization['shipped']}")  # fmt: skip
    return [{"name": ROW_NAME, "limit": limit, "value": round(value, 4),
             "status": "met" if value >= limit else "missed", "note": note}]  # fmt: skip


def quant_hint(quantization: Mapping[str, Any] | None) -> str:
    """For a missed int8 agreement: the ops holding it back and what to change (remedies.advice)."""
    if not quantization:
        return ""
    return str(quantization.get("advice") or "")
