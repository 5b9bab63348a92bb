"""How the prune stage gets from the unpruned model to the pruned one: in one step, in `pruning.steps`
iterative steps (prune -> refit or re-estimate BatchNorm -> short distillation, repeated), or by the accuracy
search.

`Planner` prunes the unpruned model (or an already pruned descendant of it) to a share of its MACs/params with
the profile's allocation: `sensitivity` follows the measured NetAdapt path (pipeline/pruning/sensitivity.py),
`uniform` and `global: true` bisect Torch-Pruning's keep ratio (pipeline/pruning/channels.py)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import PruningError
from pipeline.pruning.calibrate import Batch
from pipeline.pruning.channels import PruneResult, count_macs_params, describe, prune_to_plan, prune_to_target
from pipeline.pruning.reconstruct import recover

if TYPE_CHECKING:
    from pipeline.targets import Pruning

log = logging.getLogger(__name__)

Distill = Callable[[nn.Module, int], nn.Module]  # (pruned student, optimizer steps) -> the distilled student


def _with_keep(cfg: Pruning, keep: float) -> Pruning:
    from pipeline.targets import PruneTarget

    metric = "params" if cfg.target.metric == "params" else "macs"
    return cfg.model_copy(update={"target": PruneTarget(metric=metric, keep=min(1.0, keep))})


class Planner:
    """Prunes to a share `keep` of the ORIGINAL model's MACs (or params), then recovers (`recover`: the
    least-squares refit, or BatchNorm re-estimated). A sensitivity plan pruned from the original is then checked
    against a uniform cut of the same size (`pruning.compare_uniform`, pipeline/pruning/guard.py)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, cfg: Pruning, *, val: Sequence[Batch],
                 bn: Sequence[Batch], sens: Mapping[str, Any] | None) -> None:  # fmt: skip
        self.model, self.example, self.cfg, self.val, self.bn = model.eval(), example, cfg, val, bn
        self.metric = "params" if cfg.target.metric == "params" else "macs"
        self.macs0, self.params0 = count_macs_params(model, example)
        self.base = self.macs0 if self.metric == "macs" else self.params0
        self.path: list[tuple[float, dict[str, int]]] | None = None  # a path given (the allocation's own steps)
        self.sens = sens
        self._walker: Any = None
        self.guards: list[dict[str, Any]] = []  # the uniform guard's records, one per prune from the original

    def _path(self, down_to: float) -> list[tuple[float, dict[str, int]]]:
        from pipeline.pruning.sensitivity import SensitivityPath

        if self.path is not None:
            return self.path
        if self._walker is None:
            assert self.sens is not None
            self._walker = SensitivityPath(self.model, self.example, self.cfg, self.sens, val=self.val, bn=self.bn)
        return self._walker.extend(down_to)

    def plan_at(self, keep: float) -> dict[str, int]:
        """The sensitivity path's first plan at or under `keep` (its last when the path cannot go that far)."""
        path = self._path(keep)
        for share, plan in path:
            if share <= keep:
                return plan
        raise PruningError(f"the sensitivity path ends at {path[-1][0]:.3f} of the {self.metric}, above the "
                           f"{keep:.3f} asked for; raise pruning.max_layer_ratio or the keep")  # fmt: skip

    def prune(self, current: nn.Module, keep: float) -> nn.Module:
        """`current` (the original or a pruned descendant) pruned further to `keep` of the original."""
        cfg = self.cfg
        if self.sens is not None:
            pruned = prune_to_plan(current, self.example, self.plan_at(keep), importance=cfg.importance,
                                   keep_layers=cfg.keep_layers, batches=self.val)  # fmt: skip
        else:
            macs, params = count_macs_params(current, self.example)
            now = macs if self.metric == "macs" else params
            pruned = prune_to_target(current, self.example, _with_keep(cfg, keep * self.base / now),
                                     batches=self.val).model  # fmt: skip
        recover(self.model, pruned, cfg, self.example, self.bn)
        if self.sens is not None and cfg.compare_uniform and current is self.model:
            from pipeline.pruning.guard import uniform_alternative

            pruned, record = uniform_alternative(self.model, pruned, cfg, self.example, val=self.val, bn=self.bn,
                                                 base=(self.macs0, self.params0))  # fmt: skip
            self.guards.append({"keep_target": round(keep, 4), **record})
        return pruned

    def result(self, pruned: nn.Module, keep_target: float) -> PruneResult:
        """`pruned` described against the original model."""
        return describe(self.model, pruned, self.example, metric=self.metric,  # type: ignore[arg-type]
                        keep_target=keep_target, base=(self.macs0, self.params0))  # fmt: skip

    def at(self, keep: float) -> PruneResult:
        """The original pruned to `keep` in one step (a trial of the accuracy search)."""
        return self.result(self.prune(self.model, keep), keep)


def prune_iteratively(
    planner: Planner,
    keep: float,
    steps: int,
    *,
    distill: Distill,
    step_finetune: int,
    final_plan: Mapping[str, int] | None = None,
) -> tuple[PruneResult, list[dict[str, Any]]]:
    """`steps` rounds from the original to `keep`: each prunes to the next share (even steps in MACs), then
    recovers (refit, or BatchNorm re-estimated), and all but the last are distilled for `step_finetune` steps
    (the fine-tune stage distils the last). `final_plan`: the sensitivity allocation's plan for the last step."""
    current: nn.Module = copy.deepcopy(planner.model)
    rows = []
    for i in range(1, steps + 1):
        share = 1 - (1 - keep) * i / steps
        if i == steps and final_plan is not None:
            current = prune_to_plan(current, planner.example, final_plan, importance=planner.cfg.importance,
                                    keep_layers=planner.cfg.keep_layers, batches=planner.val)  # fmt: skip
            recover(planner.model, current, planner.cfg, planner.example, planner.bn)
        else:
            current = planner.prune(current, share)
        step = planner.result(current, share)
        if i < steps and step_finetune > 0:
            current = distill(current, step_finetune)
        rows.append({"step": i, "keep_target": round(share, 4), "keep_achieved": round(step.keep_achieved, 4),
                     "distilled_steps": step_finetune if i < steps else 0})  # fmt: skip
        log.info("iterative pruning step %d/%d: %.3f of the %s", i, steps, step.keep_achieved, planner.metric)
    return planner.result(current, keep), rows
