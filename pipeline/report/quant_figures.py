"""Quantization in the report: what each int8 remedy bought, and the ops that lose the accuracy, plotted.

Everything comes from summary["quantization"] (pipeline/quantize/remedies.py, measured on the validation
split): the remedy rows (agreement, accuracy, size, p50 latency on this host, and the latency a float
fallback costs over plain int8) and the per-op error of the first and the final int8 model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.quantize.flips import flips_text
from pipeline.report.figures import _axes, _png

TOP = 10


def _ms(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f} ms"


def remedy_rows(s: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per remedy tried: its figures and its latency cost over plain int8 (a float fallback's cost)."""
    q = s.get("quantization") or {}
    plain = q.get("plain_p50_ms")
    rows = []
    for r in q.get("steps") or []:
        p50 = r.get("p50_ms")
        cost = None if p50 is None or plain is None or plain <= 0 else p50 / plain
        status = "skipped: " + r["skipped"] if r.get("skipped") else ("kept" if r.get("kept") else "not better")
        rows.append({"remedy": r["remedy"], "agreement": r.get("agreement"), "accuracy": r.get("accuracy"),
                     "size_bytes": r.get("size_bytes"), "p50_ms": p50, "vs_plain": cost, "status": status,
                     "float_ops": r.get("float_ops") or []})  # fmt: skip
    return rows


def worst_ops(s: Mapping[str, Any], which: str = "plain", top: int = TOP) -> list[dict[str, Any]]:
    q = s.get("quantization") or {}
    return list(((q.get("op_errors") or {}).get(which) or {}).get("worst") or [])[:top]


def levels_text(o: Mapping[str, Any]) -> str:
    """The int8 levels an op's values span ("" in records from before the figure existed)."""
    v = o.get("levels")
    return "" if v is None or v != v else f"{v:.0f}"


def _label(o: Mapping[str, Any]) -> str:
    layer = o.get("layer")
    near = "after " if str(o.get("how", "")).startswith("after") else ""
    return f"#{o['op_index']} {o['op']}" + (f" ({near}{layer})" if layer else "")


def op_error_plot(s: Mapping[str, Any], top: int = TOP) -> bytes | None:
    """Bars: each op's estimated share of the output error under plain int8, with its per-channel relative
    error and cosine similarity; None without a quantization record."""
    ops = [o for o in worst_ops(s, "plain", top) if o.get("share", 0) > 0]
    if not ops:
        return None
    fig, ax = _axes(7.5, 1.0 + 0.34 * len(ops))
    labels = [_label(o) for o in ops][::-1]
    shares = [100 * float(o["share"]) for o in ops][::-1]
    bars = ax.barh(labels, shares, color="#c62828")
    for bar, o in zip(bars, ops[::-1], strict=True):
        ax.annotate(f" rel err {float(o['rel_error']):.3f}, cos {float(o['cosine']):.4f}",
                    (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)  # fmt: skip
    ax.set_xlabel("estimated share of the int8 output error (%), validation images")
    ax.set_title("Ops that lose accuracy in int8 (plain post-training quantization)", fontsize=10)
    ax.margins(x=0.35)
    return _png(fig)


def goal_text(q: Mapping[str, Any]) -> str:
    """The goal the remedies worked to: min_agreement, and max_accuracy_drop when the profile sets it."""
    goal = f"quantize.min_agreement {q['min_agreement']:g}"
    if q.get("max_accuracy_drop") is not None:
        drop = q.get("accuracy_drop")
        now = "" if drop is None else f" (int8 is {100 * drop:+.2f} points from float)"
        goal += f" and max_accuracy_drop {q['max_accuracy_drop']:g}{now}"
    return goal


def markdown_lines(s: Mapping[str, Any]) -> list[str]:
    """The report.md section: remedies, final figures, worst ops."""
    q = s.get("quantization")
    if not q:
        return []
    verdict = "met" if q["met"] else "**missed**"
    lines = ["## Quantization (int8 remedies)", "",
             f"int8 top-1 agreement with PyTorch {q['agreement']:.4f} on {q['val_images']} validation images "
             f"({q['data']}): {goal_text(q)} {verdict}, after {q['shipped']}. "
             f"fp32 p50 {_ms(q.get('fp32_p50_ms'))}, plain int8 {_ms(q.get('plain_p50_ms'))}, "
             f"shipped int8 {_ms(q.get('p50_ms'))} (this host, benchmark runner, 50 runs).", "",
             "| remedy | agreement | accuracy | size | p50 | vs plain int8 | result |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in remedy_rows(s):
        fmt = lambda v, f: "" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {r['remedy']} | {fmt(r['agreement'], '{:.4f}')} | {fmt(r['accuracy'], '{:.4f}')} | "
                     f"{fmt(r['size_bytes'], '{:,} B')} | {fmt(r['p50_ms'], '{:.3f} ms')} | "
                     f"{fmt(r['vs_plain'], '{:.2f}x')} | {r['status']} |")  # fmt: skip
    flips = flips_text(q.get("disagreements") or {}, q["val_images"])
    if flips and not q.get("advice"):  # a miss's advice ends with the same sentence
        lines += ["", flips]
    if q.get("float_ops"):
        lines += ["", "Kept in float (its latency cost is the 'vs plain int8' column): " + "; ".join(q["float_ops"])]
    lines += ["", "Worst ops under plain int8 (share of the output error is an estimate: the error each op adds "
              "over its inputs; int8 levels used = the steps its float values span, ~255 over its own range):", "",
              "| op | PyTorch layer | error / scale | cosine | rel. error | int8 levels used | share |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for o in worst_ops(s):
        lines.append(f"| #{o['op_index']} {o['op']} | {o.get('layer') or ''} | {o['error_steps']:.2f} | "
                     f"{o['cosine']:.4f} | {o['rel_error']:.3f} | {levels_text(o)} | "
                     f"{100 * o['share']:.1f}% |")  # fmt: skip
    if q.get("advice"):
        lines += ["", q["advice"]]
    return [*lines, ""]
