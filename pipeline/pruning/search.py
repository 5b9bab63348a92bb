"""`pruning.target: {metric: accuracy}`: prune as far as the accuracy budget allows, found by a bounded search.

The search is over one number, the share of MACs kept (`keep`), between `search.min_keep` and 1. A trial
prunes the unpruned model to `keep` (with the profile's allocation), re-estimates BatchNorm, fine-tunes briefly
by distillation and scores the result on the validation split. The unpruned model passes by definition and
`min_keep` is taken to fail, so the bracket starts as [min_keep, 1]. The bracket is kept in the keep *asked
for*, not the keep reached: channel multiples make the reached keep a staircase of the asked one, and a bracket
in reached keeps would ask again for a keep that lands on the model already tried. Each trial halves the
bracket while it is wider than 0.3 of the MACs (so a NetAdapt path is walked only as deep as needed), then is
placed by interpolating accuracy against keep between the bracket's ends (regula falsi with the Illinois step:
an end kept twice in a row has its distance to the edge halved, so the bracket closes from both sides), at least
a tenth of the bracket away from either end so that it always shrinks. A keep that prunes to a model already
tried (same MACs and parameters) reuses that trial's score, is recorded with `same_as`, and does not count as
a trial (at most `3 x search.trials` keeps are asked for in all). The search stops at a passing trial within
`search.tolerance` of the budget's edge (or at `min_keep`), or after `search.trials` trials. The chosen trial
is the passing one with the fewest MACs; every trial is recorded, including the ones that could not be pruned
(a `keep` the channel constraints cannot reach)."""

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
                "trials_scored": sum(1 for t in self.trials if t["keep_achieved"] is not None and "same_as" not in t),
                "chosen_keep": None if chosen is None else chosen["keep_achieved"],
                "distance_to_edge": None if chosen is None else round(chosen["val_accuracy"] - edge, 6)}  # fmt: skip


End = tuple[float, float | None]  # (keep asked for, its validation accuracy minus the edge; None: not measured)


def _next_keep(lo: End, hi: End) -> float:
    """The next keep inside the bracket (lo fails, hi passes): its midpoint while the bracket is wider than
    0.3 (accuracy against keep is flat near 1 and falls at a knee, so a straight line through far ends lands
    too high), then where the line through the ends' distances to the edge crosses zero, at least 10% of the
    bracket from either end."""
    (k_lo, r_lo), (k_hi, r_hi) = lo, hi
    width = k_hi - k_lo
    if width > 0.3 or r_lo is None or r_hi is None or r_hi <= r_lo:
        return k_lo + width / 2
    guess = k_lo + (-r_lo) / (r_hi - r_lo) * width
    return min(max(guess, k_lo + 0.1 * width), k_hi - 0.1 * width)


def _trial(prune_at: PruneAt, score: Score, keep: float, edge: float, predict: Predict | None,
           seen: dict[tuple[int, int], tuple[int, float]]) -> tuple[dict[str, Any], PruneResult | None]:  # fmt: skip
    """One keep asked for: pruned, fine-tuned and scored, or (when it prunes to a model already tried, `seen`
    maps (MACs, params) to trial numbers) that trial's score again, marked `same_as`, not fine-tuned again."""
    start = time.monotonic()
    try:
        result = prune_at(keep)
    except PruningError as exc:
        row = {"keep_target": round(keep, 4), "keep_achieved": None, "macs": None, "params": None,
               "val_accuracy": None, "passed": False, "error": str(exc)}  # fmt: skip
        return {**row, "seconds": round(time.monotonic() - start, 2)}, None
    twin = seen.get((result.macs_after, result.params_after))
    acc = score(result.model) if twin is None else twin[1]
    row = {"keep_target": round(keep, 4), "keep_achieved": round(result.keep_achieved, 4), "macs": result.macs_after,
           "params": result.params_after, "val_accuracy": round(acc, 6), "passed": acc >= edge - 1e-12,
           "seconds": round(time.monotonic() - start, 2)}  # fmt: skip
    if twin is not None:
        row["same_as"] = twin[0]
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
    lo: End = (cfg.min_keep, None)
    hi: End = (1.0, max_drop)
    last_side = ""  # which end the previous trial moved (for the Illinois step)
    best: tuple[float, int, PruneResult] | None = None
    seen: dict[tuple[int, int], tuple[int, float]] = {}  # (MACs, params) of a model tried -> (trial, accuracy)
    scored = 0
    for _ in range(3 * cfg.trials):
        if scored >= cfg.trials or hi[0] - lo[0] < 0.01:
            break  # the budget spent, or the bracket narrower than one step of any layer's channels
        keep = _next_keep(lo, hi)
        row, result = _trial(prune_at, score, keep, edge, predict, seen)
        i = len(out.trials)
        out.trials.append(row)
        if result is not None and "same_as" not in row:
            seen[(result.macs_after, result.params_after)] = (i, row["val_accuracy"])
            scored += 1
        log.info("accuracy search trial %d: keep %.3f -> %s", i + 1, keep, row.get("val_accuracy"))
        if row["passed"] and result is not None:
            achieved = row["keep_achieved"]
            cost = row.get("predicted_ms", achieved)
            if best is None or cost < best[0]:
                best = (cost, i, result)
            residual = row["val_accuracy"] - edge
            if residual <= cfg.tolerance or achieved <= cfg.min_keep:
                break  # at the edge, or at the floor of the search
            hi = (keep, residual)
            lo = (lo[0], None if lo[1] is None else lo[1] / 2) if last_side == "hi" else lo
            last_side = "hi"
        else:
            residual = None if row["val_accuracy"] is None else row["val_accuracy"] - edge
            lo = (max(lo[0], keep), residual)
            hi = (hi[0], hi[1] / 2) if last_side == "lo" else hi
            last_side = "lo"
    if best is not None:
        out.chosen, out.result = best[1], best[2]
    return out
