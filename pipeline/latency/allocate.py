"""Choose per-group channel counts that fit a latency budget and keep the most important channels.

Greedy, NetAdapt-style, driven by the measured table instead of MACs: from the full model, repeatedly take
the move (one group down to a lower candidate count) with the least cost per millisecond saved (the measured
validation loss from the sensitivity stage when it ran, else the importance criterion's share lost),
until the predicted latency fits. A move may skip several candidates: on a staircase the next step down
often saves nothing, and only crossing a step boundary pays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PruningError
from pipeline.latency.layers import Layer
from pipeline.latency.table import LatencyTable, candidates


@dataclass(frozen=True)
class Allocation:
    plan: dict[str, int]
    predicted_ms: float
    full_ms: float
    budget_ms: float
    steps: int


def allocate(
    layers: Sequence[Layer],
    groups: Mapping[str, int],
    importance: Mapping[str, np.ndarray],
    table: LatencyTable,
    *,
    budget_ms: float,
    multiple: int,
    max_ratio: float,
    cost: Callable[[str, int, int], float] | None = None,
) -> Allocation:
    """`cost(group, kept, lower)`: the measured validation loss the move costs (the sensitivity curves); the
    importance criterion's share of the removed channels breaks ties (and is the whole cost without it)."""
    plan = dict(groups)
    full_ms = predicted = table.predict(layers, plan)
    options = {
        g: candidates(total, multiple, floor=max(min(multiple, total), math.ceil(total * (1 - max_ratio))),
                      max_points=10_000)
        for g, total in groups.items()
    }  # fmt: skip
    steps = 0
    while predicted > budget_ms:
        best: tuple[float, str, int, float] | None = None
        for g, kept in plan.items():
            removed_so_far = groups[g] - kept
            for lower in (c for c in options[g] if c < kept):
                ms = table.predict(layers, {**plan, g: lower})
                saving = predicted - ms
                if saving <= 1e-9:
                    continue
                lost = float(importance[g][removed_so_far : groups[g] - lower].sum()) if g in importance else 0.0
                if cost is not None:
                    lost = cost(g, kept, lower) + 1e-3 * lost
                score = lost / saving
                if best is None or score < best[0]:
                    best = (score, g, lower, ms)
        if best is None:
            raise PruningError(
                f"cannot meet the latency budget of {budget_ms:.4g} ms: pruning every group to its limit "
                f"(pruning.max_layer_ratio, channel multiple {multiple}) is predicted at {predicted:.4g} ms "
                f"(unpruned {full_ms:.4g} ms); raise budgets.latency_ms or pruning.max_layer_ratio"
            )
        _, g, lower, predicted = best
        plan[g] = lower
        steps += 1
    return Allocation(plan, predicted, full_ms, budget_ms, steps)
