"""Prune to a latency budget measured on the target's runtime (the per-layer table), not to a MAC count."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.latency.allocate import allocate
from pipeline.latency.layers import prunable_layers
from pipeline.latency.table import LatencyTable
from pipeline.pruning.channels import (
    PruneResult,
    count_macs_params,
    group_importance,
    ignored_layers,
    layer_channels,
    prunable_groups,
    prune_to_plan,
)

if TYPE_CHECKING:
    from pipeline.targets import Pruning


@dataclass(frozen=True)
class LatencyPrune:
    result: PruneResult
    figures: dict[str, Any]


def prune_to_latency(
    model: nn.Module,
    example: torch.Tensor,
    table: LatencyTable,
    cfg: Pruning,
    *,
    budget_ms: float,
    measured_full_ms: float,
    sensitivity: Mapping[str, Any] | None = None,
) -> LatencyPrune:
    """Allocate channels against the table (scaled to the measured unpruned model), prune. With the
    sensitivity stage's curves the budget is spent where measured validation loss per millisecond saved is
    lowest, else where the importance criterion loses least."""
    importance, keep_layers = cfg.importance, cfg.keep_layers
    channel_multiple, max_ratio = cfg.channel_multiple, cfg.max_layer_ratio
    model = model.eval()
    groups = prunable_groups(model, example, keep_layers=keep_layers)
    layers = prunable_layers(model, example, ignored=ignored_layers(model, example, keep_layers))
    layer_sum = table.layer_sum(layers, groups)
    table = table.calibrated(layers, groups, measured_full_ms)
    imp = group_importance(model, example, importance=importance, keep_layers=keep_layers)
    cost = None
    if sensitivity is not None:
        from pipeline.pruning.sensitivity import loss_cost

        cost = loss_cost(sensitivity)
    alloc = allocate(layers, groups, imp, table, budget_ms=budget_ms, multiple=channel_multiple, max_ratio=max_ratio,
                     cost=cost)  # fmt: skip
    pruned = prune_to_plan(model, example, alloc.plan, importance=importance, keep_layers=keep_layers)
    if alloc.steps == 0:
        pruned = copy.deepcopy(model)
    macs0, params0 = count_macs_params(model, example)
    macs1, params1 = count_macs_params(pruned, example)
    result = PruneResult(
        model=pruned,
        metric="latency",  # type: ignore[arg-type]
        keep_target=budget_ms / measured_full_ms,
        keep_achieved=alloc.predicted_ms / measured_full_ms,
        channel_ratio=1 - sum(alloc.plan.values()) / sum(groups.values()),
        macs_before=macs0,
        macs_after=macs1,
        params_before=params0,
        params_after=params1,
        layers=tuple(layer_channels(model, pruned)),
    )
    figures = {
        "budget_ms": budget_ms,
        "predicted_ms": round(alloc.predicted_ms, 5),
        "unpruned_measured_ms": measured_full_ms,
        "unpruned_predicted_layers_ms": round(layer_sum, 5),
        "calibration_scale": round(table.scale, 4),
        "remainder_ms": round(measured_full_ms - layer_sum, 5),  # at full width; carried as a share when pruned
        "allocation_steps": alloc.steps,
        "cost": "measured validation loss (sensitivity)" if cost is not None else f"{importance} importance",
        "plan": alloc.plan,
    }
    return LatencyPrune(result, figures)
