"""How the reports write a figure: one formatter per kind, and one phrase for a figure a run did not measure."""

from __future__ import annotations

from typing import Any

NOT_MEASURED = "not measured"


def num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def pct(x: Any) -> str:
    v = num(x)
    return NOT_MEASURED if v is None else f"{100 * v:.2f}%"


def ms(x: Any) -> str:
    v = num(x)
    return NOT_MEASURED if v is None else f"{v:.4g} ms"


def count(x: Any, unit: str = "") -> str:
    v = num(x)
    return NOT_MEASURED if v is None else f"{int(v):,}{unit}"


def ratio(a: Any, b: Any) -> str:
    x, y = num(a), num(b)
    return NOT_MEASURED if x is None or not y else f"{x / y:.2f}x"
