"""The report's plots, drawn with matplotlib (Figure on the Agg canvas, no pyplot), returned as PNG bytes.

Each function takes the deploy summary (`pipeline.report.summary.summarize`) and reads only what it plots;
a missing figure gives None so the page can say "not measured" instead of failing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

DPI = 110
PLACEMENT_COLOURS = {"tpu": "#2e7d32", "cpu": "#c62828", "cpu-after-fallback": "#ef6c00", "cpu-edge": "#9e9e9e"}
PLACEMENT_LABELS = {
    "tpu": "Edge TPU",
    "cpu": "CPU (unsupported)",
    "cpu-after-fallback": "CPU (after first fallback)",
    "cpu-edge": "CPU (model I/O)",
}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")  # Agg canvas; no pyplot, no global state
    return buf.getvalue()


def _axes(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) else None


def variant_points(s: Mapping[str, Any]) -> list[dict[str, Any]]:
    """(name, accuracy, latency p50, size) for the unpruned model and every pruned precision that has them."""
    rows = []
    base = (s.get("baseline") or {}).get("tflite")
    ship = s.get("shipped_precision")
    if base:
        rows.append({"name": f"baseline {ship}" if ship else "baseline", "variant": base, "shipped": False})
    for p, v in (s.get("variants") or {}).items():
        rows.append({"name": f"pruned {p}", "variant": v, "shipped": p == ship})
    out = []
    for r in rows:
        v = r["variant"] or {}
        out.append(
            {
                "name": r["name"],
                "shipped": r["shipped"],
                "accuracy": _num(v.get("accuracy")),
                "p50": _num((v.get("latency_ms") or {}).get("p50")),
                "latency": v.get("latency_ms") or {},
                "quantiles": v.get("latency_quantiles_ms"),
                "size_bytes": _num(v.get("size_bytes")),
                "energy": v.get("energy"),
            }
        )
    return out


def latency_budget(s: Mapping[str, Any]) -> float | None:
    b = ((s.get("profile") or {}).get("budgets") or {}).get("latency_ms")
    if b is None:
        b = next((r.get("limit") for r in s.get("budgets") or [] if str(r.get("name", "")).startswith("latency")), None)
    return _num(b)


def accuracy_drop_floor(s: Mapping[str, Any]) -> float | None:
    base = _num((s.get("baseline") or {}).get("accuracy_torch"))
    drop = _num(((s.get("profile") or {}).get("budgets") or {}).get("max_accuracy_drop"))
    return None if base is None or drop is None else base - drop


def place_labels(ax: Any, points: Sequence[tuple[float, float, str]], *, fontsize: float = 8) -> list[tuple]:
    """Label each point without labels overlapping one another: points that fall on the same spot share one
    label ("a / b"), and each label takes the first offset around its point whose box is free. Returns the
    label boxes in display pixels (x0, y0, x1, y1), for the tests."""
    fig = ax.figure
    fig.canvas.draw()  # the limits are final: data -> pixels
    to_px = ax.transData.transform
    groups: list[list[Any]] = []
    for x, y, text in sorted(points, key=lambda p: (p[1], p[0]), reverse=True):
        px = to_px((x, y))
        for g in groups:
            if abs(g[0][0] - px[0]) < 6 and abs(g[0][1] - px[1]) < 6:
                g[2].append(text)
                break
        else:
            groups.append([px, (x, y), [text]])
    scale = fig.dpi / 72.0
    char_w, line_h = 0.6 * fontsize * scale, 1.3 * fontsize * scale
    boxes: list[tuple[float, float, float, float]] = []
    for px, xy, texts in groups:
        text = " / ".join(texts)
        w = char_w * len(text)
        for dx, dy in ((7, 4), (7, -14), (7, 16), (7, -26), (-7 - w / scale, 4), (-7 - w / scale, -14), (7, 28)):
            x0, y0 = px[0] + dx * scale, px[1] + dy * scale
            box = (x0, y0, x0 + w, y0 + line_h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                break
        boxes.append(box)
        ax.annotate(text, xy, textcoords="offset points", xytext=((box[0] - px[0]) / scale, (box[1] - px[1]) / scale),
                    fontsize=fontsize)  # fmt: skip
    return boxes


def accuracy_vs_latency(s: Mapping[str, Any]) -> bytes | None:
    pts = [p for p in variant_points(s) if p["accuracy"] is not None and p["p50"] is not None]
    if not pts:
        return None
    fig, ax = _axes(6.4, 4.0)
    for p in pts:
        marker = "*" if p["shipped"] else ("s" if p["name"].startswith("baseline") else "o")
        ax.scatter(p["p50"], 100 * p["accuracy"], s=180 if p["shipped"] else 60, marker=marker, zorder=3)
    budget = latency_budget(s)
    if budget is not None:
        ax.axvline(budget, color="#c62828", linestyle="--", label=f"latency budget {budget:g} ms")
    floor = accuracy_drop_floor(s)
    if floor is not None:
        ax.axhline(100 * floor, color="#6a1b9a", linestyle=":", label=f"accuracy floor {100 * floor:.2f}%")
    xs = [p["p50"] for p in pts] + ([budget] if budget is not None else [])
    if max(xs) / min(xs) > 8:  # a far budget would squeeze the variants into one spot
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.5, max(xs) * 1.5)
        ax.set_xlabel("latency p50 (ms, log scale)")
    else:
        ax.set_xlim(0, max(xs) * 1.25)
        ax.set_xlabel("latency p50 (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs latency, every variant")
    ax.grid(alpha=0.3)
    ax.margins(y=0.25)  # markers and labels stay inside the axes
    labels = [(p["p50"], 100 * p["accuracy"], p["name"] + (" (shipped)" if p["shipped"] else "")) for p in pts]
    place_labels(ax, labels)
    if budget is not None or floor is not None:
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def channels_per_layer(s: Mapping[str, Any]) -> bytes | None:
    layers = [r for r in (s.get("pruned") or {}).get("layers") or [] if "before" in r and "after" in r]
    if not layers:
        return None
    names = [str(r["name"]) for r in layers]
    before = [r["before"] for r in layers]
    after = [r["after"] for r in layers]
    height = max(2.5, 0.32 * len(layers) + 1.2)
    fig, ax = _axes(6.4, height)
    ys = range(len(layers))
    ax.barh([y + 0.2 for y in ys], before, height=0.4, color="#90a4ae", label="before pruning")
    ax.barh([y - 0.2 for y in ys], after, height=0.4, color="#1565c0", label="after pruning")
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("output channels")
    ax.set_title("Channels per layer")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _series(x: Any) -> list[float] | None:
    vals = [_num(v) for v in x] if isinstance(x, Sequence) and not isinstance(x, str) else []
    return [v for v in vals if v is not None] if len(vals) > 2 and all(v is not None for v in vals) else None


def latency_source(points: Sequence[Mapping[str, Any]]) -> str:
    """What the latency plot can be drawn from for all variants: samples, quantiles or percentiles."""
    if points and all(_series(p["latency"].get("samples")) for p in points):
        return "samples"
    if points and all(_series(p["quantiles"]) for p in points):
        return "quantiles"
    return "percentiles"


def _ladder(ax: Any, pts: Sequence[Mapping[str, Any]]) -> None:
    """min-max line, p50-p90 bar, p99 and mean markers per variant."""
    for y, p in enumerate(pts):
        lat = {k: _num(v) for k, v in p["latency"].items()}
        lo, hi = lat.get("min") or lat["p50"], lat.get("max") or lat.get("p99") or lat["p50"]
        ax.hlines(y, lo, hi, color="#90a4ae", linewidth=1.5, zorder=1)
        ax.hlines(y, lat["p50"], lat.get("p90") or lat["p50"], color="#1565c0", linewidth=9, zorder=2)
        for key, marker in (("p99", "x"), ("mean", "D")):
            if lat.get(key) is not None:
                ax.scatter(lat[key], y, marker=marker, color="black", s=50 if key != "mean" else 18, zorder=3)
    ax.legend(
        handles=[
            Patch(color="#90a4ae", label="min-max"),
            Patch(color="#1565c0", label="p50-p90"),
            Line2D([], [], marker="x", color="black", linestyle="", label="p99"),
            Line2D([], [], marker="D", color="black", linestyle="", markersize=4, label="mean"),
        ],
        fontsize=8,
        loc="upper right",
    )
    ax.set_yticks(range(len(pts)), [p["name"] for p in pts], fontsize=8)


def latency_distribution(s: Mapping[str, Any]) -> tuple[bytes | None, str]:
    """The plot and what it was drawn from: every timed run ("samples"), the runner's 5%-step quantiles
    ("quantiles", drawn as cumulative distributions) or only p50/p90/p99/min/max/mean ("percentiles")."""
    pts = [p for p in variant_points(s) if p["p50"] is not None]
    if not pts:
        return None, "none"
    source = latency_source(pts)
    if source == "quantiles":
        fig, ax = _axes(6.4, 4.0)
        for p in pts:
            q = _series(p["quantiles"]) or []
            ax.plot(q, [100 * i / (len(q) - 1) for i in range(len(q))], marker=".", label=p["name"],
                    linewidth=2.2 if p["shipped"] else 1.2)  # fmt: skip
        ax.set_ylabel("share of runs at most this slow (%)")
        ax.set_ylim(0, 100)
    else:
        fig, ax = _axes(6.4, 0.55 * len(pts) + 1.5)
        if source == "samples":
            data = [_series(p["latency"]["samples"]) for p in pts]
            ax.violinplot(data, vert=False, showmedians=True, positions=range(len(pts)))
            ax.set_yticks(range(len(pts)), [p["name"] for p in pts], fontsize=8)
        else:
            _ladder(ax, pts)
    ax.set_xscale("log")
    ax.set_xlabel("latency per inference (ms, log scale)")
    title = {"samples": "", "quantiles": " (cumulative, from 5% quantiles)", "percentiles": " (recorded percentiles)"}
    ax.set_title("Latency distribution" + title[source])
    ax.grid(alpha=0.3, which="both")
    budget = latency_budget(s)
    if budget is not None:
        ax.axvline(budget, color="#c62828", linestyle="--", label=f"budget {budget:g} ms")
    if source == "quantiles":
        ax.legend(fontsize=8, loc="lower right")
    return _png(fig), source


def energy_rows(s: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Energy per inference for each variant that has it (`variants.<p>.energy` or the summary's `energy`)."""
    rows = []
    for p in variant_points(s):
        e = p["energy"]
        if isinstance(e, Mapping) and _num(e.get("energy_per_inference_mj")) is not None:
            rows.append({"name": p["name"], **e})
    top = s.get("energy")
    if not rows and isinstance(top, Mapping):
        if _num(top.get("energy_per_inference_mj")) is not None:
            rows.append({"name": f"pruned {s.get('shipped_precision')}", **top})
        else:
            for name, e in top.items():
                if isinstance(e, Mapping) and _num(e.get("energy_per_inference_mj")) is not None:
                    rows.append({"name": str(name), **e})
    return rows


def energy_estimated(row: Mapping[str, Any]) -> bool:
    """Energy per inference is active power x latency: an estimate exactly when the active power is one."""
    return bool(row.get("active_estimated", row.get("estimated")))


def energy(s: Mapping[str, Any]) -> bytes | None:
    rows = energy_rows(s)
    if not rows:
        return None
    fig, ax = _axes(6.4, 0.5 * len(rows) + 1.5)
    ys = range(len(rows))
    values = [float(r["energy_per_inference_mj"]) for r in rows]
    colours = ["#ffb74d" if energy_estimated(r) else "#2e7d32" for r in rows]
    bars = ax.barh(
        list(ys),
        values,
        color=colours,
    )
    for bar, r in zip(bars, rows, strict=True):
        if energy_estimated(r):
            bar.set_hatch("//")
        ax.annotate(
            f"{r['energy_per_inference_mj']:.3g} mJ" + (" (estimated)" if energy_estimated(r) else " (measured)"),
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(list(ys), [r["name"] for r in rows], fontsize=8)
    ax.set_xlim(0, max(values) * 1.6)
    ax.set_xlabel("energy per inference (mJ)")
    estimated = any(energy_estimated(r) for r in rows)
    ax.set_title("Energy per inference" + (" (hatched: estimated, not measured)" if estimated else ""))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def edgetpu_op_map(ops: Sequence[Mapping[str, Any]]) -> bytes | None:
    """One cell per op in execution order, coloured by where it runs."""
    if not ops:
        return None
    cols = min(len(ops), 12)
    rows = math.ceil(len(ops) / cols)
    fig, ax = _axes(max(4.0, 0.62 * cols + 0.6), 0.62 * rows + 1.1)
    for i, op in enumerate(ops):
        r, c = divmod(i, cols)
        colour = PLACEMENT_COLOURS.get(str(op.get("placement")), "#424242")
        ax.add_patch(Rectangle((c, -r), 0.94, 0.9, color=colour))
        label = str(op.get("op", "?"))
        label = label if len(label) <= 9 else label[:8] + "."
        ax.text(c + 0.47, -r + 0.58, f"{op.get('index', i)}", ha="center", va="center", color="white", fontsize=7)
        ax.text(c + 0.47, -r + 0.28, label, ha="center", va="center", color="white", fontsize=5.5)
    ax.set_xlim(-0.1, cols)
    ax.set_ylim(-rows + 0.9, 1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    seen = []
    for o in ops:
        if str(o.get("placement")) not in seen:
            seen.append(str(o.get("placement")))
    ax.legend(
        handles=[Patch(color=PLACEMENT_COLOURS.get(p, "#424242"), label=PLACEMENT_LABELS.get(p, p)) for p in seen],
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=len(seen),
        frameon=False,
    )
    ax.set_title("Edge TPU op map (execution order)", fontsize=9)
    return _png(fig)


def comparison(summaries: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Shipped model of each target: accuracy against latency p50, point size by model size."""
    pts = []
    for s in summaries:
        ship = s.get("shipped_precision")
        v = (s.get("variants") or {}).get(ship) or {}
        acc, p50 = _num(v.get("accuracy")), _num((v.get("latency_ms") or {}).get("p50"))
        if acc is not None and p50 is not None:
            pts.append((f"{s.get('target')} ({ship})", p50, acc, _num(v.get("size_bytes")) or 0.0))
    if not pts:
        return None
    fig, ax = _axes(6.4, 4.0)
    biggest = max(p[3] for p in pts) or 1.0
    for _name, p50, acc, size in pts:
        ax.scatter(p50, 100 * acc, s=40 + 400 * size / biggest, alpha=0.7, zorder=3)
    ax.set_xlim(0, max(p[1] for p in pts) * 1.3)
    ax.margins(y=0.25)
    place_labels(ax, [(p50, 100 * acc, name) for name, p50, acc, _ in pts])
    ax.set_xlabel("latency p50 (ms, where measured)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Shipped model per target (marker area: file size)")
    ax.grid(alpha=0.3)
    return _png(fig)


def sensitivity(s: Mapping[str, Any]) -> bytes | None:
    """Per prunable group: validation accuracy with only that group pruned, against the share of its channels
    removed (the curves the allocation ranks its candidates by)."""
    sens = s.get("sensitivity") or {}
    groups = sens.get("groups") or {}
    if not groups:
        return None
    base = sens.get("base") or {}
    fig, ax = _axes(6.4, 4.0)
    for name, entry in groups.items():
        rows = sorted(entry.get("levels") or [], key=lambda r: -r["keep"])
        if not rows:
            continue
        n = entry["channels"]
        xs = [0.0] + [100 * (1 - r["keep"] / n) for r in rows]
        ys = [100 * base.get("accuracy", float("nan"))] + [100 * r["accuracy"] for r in rows]
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{name} ({n})")
    ax.set_xlabel("channels removed from this group alone (%)")
    ax.set_ylabel("validation accuracy (%), BatchNorm re-estimated")
    ax.set_title(f"Sensitivity per layer ({sens.get('val_images', '?')} validation images)")
    ax.grid(alpha=0.3)
    ax.margins(y=0.1)
    if len(groups) <= 16:
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    return _png(fig)
