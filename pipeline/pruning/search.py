"""`pruning.target: {metric: accuracy}`: prune as far as the accuracy budget allows, found by a bounded search.

The search is over one number, the share of MACs kept (`keep`), between `search.min_keep` and 1. A trial
prunes the unpruned model to `keep` (with the profile's allocation), re-estimates BatchNorm, fine-tunes briefly
by distillation and scores the result on the validation split. The unpruned model passes by definition and
`min_keep` is taken to fail, so the bracket starts as [min_keep, 1]; each trial halves it while it is wider
than 0.3 of the MACs (so a NetAdapt path is walked only as deep as needed), then is placed by interpolating
accuracy against keep between the bracket's ends (regula falsi), at least a tenth of the bracket away from
either end so that the bracket always shrinks. The search stops at a passing trial within `search.tolerance`
of the budget's edge (or at `min_keep`), or after `search.trials` trials. The chosen trial is the passing one
with the fewest MACs; every trial is recorded, including the ones that could not be pruned (a `keep` the
channel constraints cannot reach)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from pipeline.errors import PruningError
from pipeline.pruning.channels import PruneResult

if TYPE_CHECKING:
    from pipeline.targets import Search

log = logging.getLogger(__name__)

PruneAt = Callable[[float], PruneResult]  # keep (share of MACs) -> the pruned model, BatchNorm re-estimated
Score = Callable[[nn.Module], float]  # pruned model -> validation accuracy after the trial's short fine-tune
Predict = Callable[[nn.Module], float]  # pruned model -> latency predicted by the target's table (ms)


@dataclass
class SearchOutcome:
    """Every trial, and which one was chosen (None: no pruned trial met the budget, the model stays whole)."""

    base_accuracy: float
    max_drop: float
    trials: list[dict[str, Any]] = field(default_factory=list)
    chosen: int | None = None
    result: PruneResult | None = None

    def figures(self) -> dict[str, Any]:
        chosen = self.trials[self.chosen] if self.chosen is not None else None
        edge = self.base_accuracy - self.max_drop
        return {"base_val_accuracy": round(self.base_accuracy, 6), "max_accuracy_drop": self.max_drop,
                "edge_val_accuracy": round(edge, 6), "trials": self.trials, "chosen": self.chosen,
                "chosen_keep": None if chosen is None else chosen["keep_achieved"],
                "distance_to_edge": None if chosen is None else round(chosen["val_accuracy"] - edge, 6)}  # fmt: skip


def _next_keep(lo: tuple[float, float | None], hi: tuple[float, float], edge: float) -> float:
    """The next keep inside the bracket (lo fails, hi passes): its midpoint while the bracket is wider than
    0.3 (accuracy against keep is flat near 1 and falls at a knee, so a straight line through far ends lands
    too high), then interpolated, at least 10% of the bracket from either end."""
    (k_lo, a_lo), (k_hi, a_hi) = lo, hi
    width = k_hi - k_lo
    if width > 0.3 or a_lo is None or a_hi <= a_lo:
        return k_lo + width / 2
    guess = k_lo + (edge - a_lo) / (a_hi - a_lo) * width
    return min(max(guess, k_lo + 0.1 * width), k_hi - 0.1 * width)


def _trial(prune_at: PruneAt, score: Score, keep: float, edge: float,
           predict: Predict | None = None) -> tuple[dict[str, Any], PruneResult | None]:  # fmt: skip
    start = time.monotonic()
    try:
        result = prune_at(keep)
    except PruningError as exc:
        row = {"keep_target": round(keep, 4), "keep_achieved": None, "macs": None, "params": None,
               "val_accuracy": None, "passed": False, "error": str(exc)}  # fmt: skip
        return {**row, "seconds": round(time.monotonic() - start, 2)}, None
    acc = score(result.model)
    row = {"keep_target": round(keep, 4), "keep_achieved": round(result.keep_achieved, 4), "macs": result.macs_after,
           "params": result.params_after, "val_accuracy": round(acc, 6), "passed": acc >= edge - 1e-12,
           "seconds": round(time.monotonic() - start, 2)}  # fmt: skip
    if predict is not None:
        row["predicted_ms"] = round(predict(result.model), 5)
    return row, result


def search_keep(
    prune_at: PruneAt,
    score: Score,
    *,
    base_accuracy: float,
    max_drop: float,
    cfg: Search,
    predict: Predict | None = None,
) -> SearchOutcome:
    """The least `keep` whose trial stays within `max_drop` of `base_accuracy` (validation), in at most
    `cfg.trials` trials; see the module docstring. With `predict` (the latency table) every trial's predicted
    latency is recorded and the passing trial predicted fastest is chosen."""
    out = SearchOutcome(base_accuracy, max_drop)
    edge = base_accuracy - max_drop
    lo: tuple[float, float | None] = (cfg.min_keep, None)
    hi: tuple[float, float] = (1.0, base_accuracy)
    best: tuple[float, int, PruneResult] | None = None
    keep = _next_keep(lo, hi, edge)
    for i in range(cfg.trials):
        row, result = _trial(prune_at, score, keep, edge, predict)
        out.trials.append(row)
        log.info("accuracy search trial %d: keep %.3f -> %s", i + 1, keep, row.get("val_accuracy"))
        achieved = row["keep_achieved"] if row["keep_achieved"] is not None else keep
        if row["passed"] and result is not None:
            cost = row.get("predicted_ms", achieved)
            if best is None or cost < best[0]:
                best = (cost, i, result)
            hi = (achieved, row["val_accuracy"])
            if row["val_accuracy"] - edge <= cfg.tolerance or achieved <= cfg.min_keep:
                break  # at the edge, or at the floor of the search
        else:
            lo = (max(lo[0], achieved if row["keep_achieved"] is not None else keep), row["val_accuracy"])
        if hi[0] - lo[0] < 0.01:
            break  # the bracket is narrower than one step of any layer's channels
        keep = _next_keep(lo, hi, edge)
    if best is not None:
        out.chosen, out.result = best[1], best[2]
    return out
