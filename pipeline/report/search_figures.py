"""The accuracy search's Pareto plot: every trial's MACs against its validation accuracy after the trial's short
fine-tune, the budget's edge drawn, the chosen trial marked (PNG bytes, like pipeline/report/figures.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.report.figures import _axes, _png, place_labels


def search_trials(s: Mapping[str, Any]) -> bytes | None:
    search = (s.get("pruned") or {}).get("search") or {}
    numbered = [
        (i + 1, t)
        for i, t in enumerate(search.get("trials") or [])
        if t.get("val_accuracy") is not None and t.get("macs") and t.get("same_as") is None
    ]
    trials = [t for _, t in numbered]  # a keep that landed on a model already tried is that trial's point
    if not trials:
        return None
    base_macs = (s.get("baseline") or {}).get("macs")
    fig, ax = _axes(6.4, 4.0)
    by_latency = all(t.get("predicted_ms") is not None for t in trials)
    x_of = (lambda t: t["predicted_ms"]) if by_latency else (lambda t: 100 * t["keep_achieved"])
    xs = [x_of(t) for t in trials]
    ys = [100 * t["val_accuracy"] for t in trials]
    colours = ["#2e7d32" if t["passed"] else "#c62828" for t in trials]
    ax.scatter(xs, ys, c=colours, s=28, zorder=3)
    if not by_latency:
        ax.scatter([100.0], [100 * search["base_val_accuracy"]], marker="s", c="#555555", s=30, zorder=3)
    chosen = search.get("chosen")
    if chosen is not None:
        t = search["trials"][chosen]
        ax.scatter([x_of(t)], [100 * t["val_accuracy"]], marker="*", s=220, c="#fbc02d",
                   edgecolors="black", zorder=4, label="chosen")  # fmt: skip
    ax.axhline(100 * search["edge_val_accuracy"], color="#c62828", ls="--", lw=1,
               label=f"budget edge (drop {100 * search['max_accuracy_drop']:.1f} points)")  # fmt: skip
    place_labels(ax, [(x, y, f"#{n}") for (n, _), x, y in zip(numbered, xs, ys, strict=True)], fontsize=7)
    macs_note = f" of {base_macs:,}" if isinstance(base_macs, int) else ""
    ax.set_xlabel("latency predicted by the target's table (ms)" if by_latency
                  else f"MACs kept (% of the unpruned model's{macs_note})")  # fmt: skip
    ax.set_ylabel("validation accuracy (%) after the trial's fine-tune")
    ax.set_title(f"Accuracy search: {len(trials)} trials (green within budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)
