"""The uniform guard (`pruning.compare_uniform`): a sensitivity allocation is kept only if it beats a uniform
cut of the same size.

The sensitivity allocation is built from per-group measurements made with BatchNorm re-estimated (cheap
enough to run for every group and level), but the model that ships is recovered by the least-squares refit;
and on a few hundred images, the measurements themselves are noisy. Either can make the allocation worse than
simply taking the same share of every layer (it was, on EfficientNet-Lite0 with 13 training photos:
BENCHMARKS.md). So the uniform cut at no more than the allocation's MACs (or params) is pruned too, recovered
the same way, and both are scored on the validation split; the better one (accuracy, then loss; the
allocation on a tie) is the one kept, and both scores are recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import PruningError
from pipeline.pruning.calibrate import Batch, evaluate
from pipeline.pruning.channels import count_macs_params, prune_to_target
from pipeline.pruning.reconstruct import recover

if TYPE_CHECKING:
    from pipeline.targets import Pruning

log = logging.getLogger(__name__)


def _score(model: nn.Module, val: Sequence[Batch], reference: nn.Module | None, keep: float) -> dict[str, float]:
    loss, acc = evaluate(model, val, reference=reference)
    return {"val_accuracy": round(acc, 6), "val_loss": round(loss, 6), "keep": round(keep, 4)}


def uniform_alternative(
    unpruned: nn.Module,
    allocated: nn.Module,
    cfg: Pruning,
    example: torch.Tensor,
    *,
    val: Sequence[Batch],
    bn: Sequence[Batch],
    base: tuple[int, int] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """`allocated` (pruned by the sensitivity allocation and already recovered) or the uniform cut of no more
    than its MACs/params, whichever scores better on `val` (unlabelled batches: agreement with `unpruned`).
    `base`: the unpruned (MACs, params), when already counted. Returns the model kept and the record."""
    from pipeline.targets import PruneTarget

    metric = "params" if cfg.target.metric == "params" else "macs"
    macs0, params0 = base or count_macs_params(unpruned, example)
    whole = macs0 if metric == "macs" else params0
    macs, params = count_macs_params(allocated, example)
    keep = (macs if metric == "macs" else params) / whole
    ucfg = cfg.model_copy(update={"allocation": "uniform", "global_pruning": False,
                                  "target": PruneTarget(metric=metric, keep=min(1.0, keep))})  # fmt: skip
    reference = unpruned if val and val[0][1] is None else None
    try:
        cut = prune_to_target(unpruned, example, ucfg, batches=val)  # its keep_achieved: against the same counts
    except PruningError as exc:  # no uniform cut is that small (max_layer_ratio, channel multiples): nothing to compare
        log.info("uniform guard: no uniform cut keeps %.3f of the %s (%s); the allocation is kept", keep, metric, exc)
        return allocated, {"sensitivity": _score(allocated, val, reference, keep), "uniform": None,
                           "chosen": "sensitivity", "why": str(exc)}  # fmt: skip
    uniform = cut.model
    recover(unpruned, uniform, cfg, example, bn)
    record = {
        "sensitivity": _score(allocated, val, reference, keep),
        "uniform": _score(uniform, val, reference, cut.keep_achieved),
    }
    s, u = record["sensitivity"], record["uniform"]
    better = (u["val_accuracy"], -u["val_loss"]) > (s["val_accuracy"], -s["val_loss"])
    record["chosen"] = "uniform" if better else "sensitivity"
    log.info("uniform guard: sensitivity %.4f (loss %.4f) vs uniform %.4f (loss %.4f) at %.3f of the %s: %s kept",
             s["val_accuracy"], s["val_loss"], u["val_accuracy"], u["val_loss"], keep, metric,
             record["chosen"])  # fmt: skip
    return (uniform if better else allocated), record
