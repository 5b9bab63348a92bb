"""Where the time goes: the shipped model's per-op profile on the device (summary["op_profile"]) as a plot and rows.

The profile comes from pipeline/devices/op_profile.py (benchmark_model's op profiler on the device). Ops are
grouped by the PyTorch layer they were linked to, because that is what pruning can act on: a layer whose ops take
a large share is where removing channels pays. Ops with no layer keep their op type as label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.report.figures import _axes, _png

TOP = 12


def op_rows(s: Mapping[str, Any], *, top: int = TOP) -> list[dict[str, Any]]:
    """The slowest ops first: {"op", "type", "layer", "ms", "share"} (at most `top`)."""
    prof = s.get("op_profile") or {}
    ops = sorted(prof.get("ops") or [], key=lambda o: -float(o.get("ms") or 0))
    return [{"op": o.get("tflite_op"), "type": o.get("type"), "layer": o.get("layer"), "ms": o.get("ms"),
             "share": o.get("share"), "link": o.get("link")} for o in ops[:top]]  # fmt: skip


def by_layer(s: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(label, ms, share) per PyTorch layer (ops without one under their op type), slowest first."""
    prof = s.get("op_profile") or {}
    acc: dict[str, list[float]] = {}
    for o in prof.get("ops") or []:
        label = o.get("layer") or f"({o.get('tflite_type') or o.get('type')})"
        a = acc.setdefault(str(label), [0.0, 0.0])
        a[0] += float(o.get("ms") or 0)
        a[1] += float(o.get("share") or 0)
    return sorted(((k, v[0], v[1]) for k, v in acc.items()), key=lambda r: -r[1])


def where_the_time_goes(s: Mapping[str, Any], *, top: int = TOP) -> bytes | None:
    """A horizontal bar per PyTorch layer (top `top`), ms per inference with its share; None without a profile."""
    prof = s.get("op_profile") or {}
    rows = by_layer(s)[:top]
    if not prof.get("available") or not rows:
        return None
    fig, ax = _axes(7.0, 0.9 + 0.32 * len(rows))
    labels = [r[0] for r in rows][::-1]
    values = [r[1] for r in rows][::-1]
    bars = ax.barh(labels, values, color="#1565c0")
    for bar, (_, ms, share) in zip(bars, rows[::-1], strict=True):
        ax.annotate(f" {ms:.3g} ms ({100 * share:.1f}%)", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                    va="center", fontsize=8)  # fmt: skip
    ax.set_xlabel("ms per inference (benchmark_model op profiler)")
    ax.set_title(f"Where the time goes on {prof.get('device', '?')}", fontsize=10)
    ax.margins(x=0.25)
    return _png(fig)
