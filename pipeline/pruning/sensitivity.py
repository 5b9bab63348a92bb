"""Sensitivity-aware pruning: measure what each group costs when pruned alone, then spend the cut where it
costs least, measured.

`measure_sensitivity` prunes every prunable group by itself to each level (a share of its channels removed,
on the channel multiple), re-estimates BatchNorm, and records the validation loss and accuracy and the MACs
and parameters that remain: the curves the report plots. `allocate` reaches a MAC or parameter target one
step at a time (NetAdapt's loop): the groups the curves rank cheapest are each tried one step smaller, pruned
for real with BatchNorm re-estimated, and the step that raises the measured validation loss least per MAC
saved is taken. Savings of neighbouring groups are not additive (a group's output is the next one's input),
which is why each step is measured on the whole model rather than read off the single-group curves."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import PruningError
from pipeline.pruning.calibrate import Batch, evaluate, pseudo_labelled, recalibrate_bn
from pipeline.pruning.channels import (
    PruneResult,
    count_macs_params,
    layer_channels,
    prunable_groups,
    prune_to_plan,
)

if TYPE_CHECKING:
    from pipeline.targets import Pruning

log = logging.getLogger(__name__)


def level_counts(total: int, levels: Sequence[float], *, multiple: int, max_ratio: float) -> list[int]:
    """Channel counts to keep for each level (share removed), on the multiple, never below the floor."""
    floor = max(1, int(np.ceil(total * (1 - max_ratio))))
    out = []
    for level in levels:
        keep = round(total * (1 - level) / multiple) * multiple
        keep = min(total, max(keep, -(-floor // multiple) * multiple))
        if keep < total and keep not in out:
            out.append(keep)
    return out


def measure_sensitivity(
    model: nn.Module,
    example: torch.Tensor,
    cfg: Pruning,
    *,
    val: Sequence[Batch],
    bn: Sequence[Batch],
    progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] = (0, 1),
) -> dict[str, Any]:
    """Per prunable group: channels, and for each level the kept channels, validation loss and accuracy, and
    the MACs and parameters of the model with only that group pruned (BatchNorm re-estimated on `bn`).
    `part` (i, n): only every n-th (group, level) measurement from the i-th (one rank's share; `merge_parts`
    puts the shares back together)."""
    model = model.eval()
    val = pseudo_labelled(val, model)  # unlabelled: agreement with the unpruned model, its answers computed once
    base_loss, base_acc = evaluate(model, val)
    macs0, params0 = count_macs_params(model, example)
    groups = prunable_groups(model, example, keep_layers=cfg.keep_layers)
    todo = {g: level_counts(n, cfg.sensitivity.levels, multiple=cfg.channel_multiple, max_ratio=cfg.max_layer_ratio)
            for g, n in groups.items()}  # fmt: skip
    total, done, index = sum(len(v) for v in todo.values()), 0, -1
    out: dict[str, Any] = {}
    for g, counts in todo.items():
        rows = []
        for keep in counts:
            index += 1
            if index % part[1] != part[0]:
                continue
            pruned = prune_to_plan(model, example, {g: keep}, importance=cfg.importance,
                                   keep_layers=cfg.keep_layers, batches=val, groups=groups)  # fmt: skip
            if cfg.recalibrate_bn:
                recalibrate_bn(pruned, bn)
            loss, acc = evaluate(pruned, val)
            macs, params = count_macs_params(pruned, example)
            rows.append({"keep": keep, "loss": round(loss, 6), "accuracy": round(acc, 6), "macs": macs,
                         "params": params})  # fmt: skip
            done += 1
            if progress is not None:
                progress(done, total)
        out[g] = {"channels": groups[g], "levels": rows}
    return {"base": {"loss": round(base_loss, 6), "accuracy": round(base_acc, 6), "macs": macs0, "params": params0},
            "groups": out, "val_images": sum(len(b[0]) for b in val)}  # fmt: skip


def merge_parts(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The sensitivity of the whole model from every share `measure_sensitivity(part=...)` measured: each
    group's levels from all of them, widest first (the order one process measures them in)."""
    first = parts[0]
    groups = {}
    for g, entry in first["groups"].items():
        rows = [row for part in parts for row in part["groups"][g]["levels"]]
        groups[g] = {"channels": entry["channels"], "levels": sorted(rows, key=lambda r: -r["keep"])}
    return {"base": first["base"], "groups": groups, "val_images": first["val_images"]}


@dataclass(frozen=True)
class _Curve:
    """One group's cost and saving as functions of the channels it keeps (piecewise linear in the measured
    points, through zero at full width; extrapolated with the last slope below the deepest level)."""

    channels: int
    keeps: np.ndarray  # increasing, ending at `channels`
    cost: np.ndarray  # validation loss increase (clipped at 0)
    saving: np.ndarray  # MACs or params saved

    def at(self, keep: int) -> tuple[float, float]:
        if keep >= self.keeps[0]:
            return float(np.interp(keep, self.keeps, self.cost)), float(np.interp(keep, self.keeps, self.saving))
        k0, k1 = self.keeps[0], self.keeps[1] if len(self.keeps) > 1 else self.channels
        frac = (k0 - keep) / max(k1 - k0, 1)
        c = self.cost[0] + frac * (self.cost[0] - (self.cost[1] if len(self.cost) > 1 else 0.0))
        s = self.saving[0] + frac * (self.saving[0] - (self.saving[1] if len(self.saving) > 1 else 0.0))
        return float(max(c, self.cost[0])), float(max(s, self.saving[0]))


def _curves(sens: Mapping[str, Any], metric: str) -> dict[str, _Curve]:
    base = sens["base"]
    out = {}
    for g, entry in sens["groups"].items():
        rows = sorted(entry["levels"], key=lambda r: r["keep"])
        if not rows:
            continue
        keeps = np.array([r["keep"] for r in rows] + [entry["channels"]], dtype=float)
        cost = np.array([max(0.0, r["loss"] - base["loss"]) for r in rows] + [0.0])
        saving = np.array([max(0.0, base[metric] - r[metric]) for r in rows] + [0.0])
        out[g] = _Curve(entry["channels"], keeps, np.maximum.accumulate(cost[::-1])[::-1], saving)
    return out


def loss_cost(sens: Mapping[str, Any]) -> Callable[[str, int, int], float]:
    """(group, kept, lower) -> the validation loss increase the sensitivity curves predict for cutting that
    group from `kept` to `lower` channels (0 for a group the curves do not cover)."""
    curves = _curves(sens, "macs")

    def cost(group: str, kept: int, lower: int) -> float:
        c = curves.get(group)
        return 0.0 if c is None else max(0.0, c.at(lower)[0] - c.at(kept)[0])

    return cost


class _Pruner:
    """Prunes plans of one model for real: the pruned copy with its MACs, params and the target metric's value;
    `measure` also re-estimates BatchNorm and scores it on the validation batches (loss)."""

    def __init__(self, model: nn.Module, example: torch.Tensor, cfg: Pruning, val: Sequence[Batch],
                 bn: Sequence[Batch]) -> None:  # fmt: skip
        self.model, self.example, self.cfg, self.bn = model, example, cfg, bn
        self.val = pseudo_labelled(val, model)  # unlabelled: the unpruned model's answers, computed once
        self.trials = 0
        self.groups = prunable_groups(model, example, keep_layers=cfg.keep_layers)
        self.metric = "params" if cfg.target.metric == "params" else "macs"

    def prune(self, plan: Mapping[str, int]) -> tuple[nn.Module, int, int, float]:
        cfg = self.cfg
        pruned = prune_to_plan(self.model, self.example, plan, importance=cfg.importance,
                               keep_layers=cfg.keep_layers, batches=self.val, groups=self.groups)  # fmt: skip
        macs, params = count_macs_params(pruned, self.example)
        return pruned, macs, params, float(macs if self.metric == "macs" else params)

    def measure(self, plan: Mapping[str, int]) -> tuple[nn.Module, float, float]:
        pruned, _, _, value = self.prune(plan)
        if self.cfg.recalibrate_bn:
            recalibrate_bn(pruned, self.bn)
        loss, _ = evaluate(pruned, self.val)
        self.trials += 1
        return pruned, loss, value


def _step_up(plan: Mapping[str, int], g: str, c: _Curve, m: int) -> int:
    return min(c.channels, plan[g] + m - plan[g] % m)


def _refine(pr: _Pruner, curves: Mapping[str, _Curve], best: tuple, *, target: float, tolerance: float,
            trials: list, base: float, rounds: int = 12) -> tuple:  # fmt: skip
    """Give channels back, one step of one group at a time (the step that costs least loss per unit of
    MACs/params regained, measured for real), while the model stays at or under the target."""
    for _ in range(rounds):
        plan, value = best[0], best[2]
        if value >= target * (1 - tolerance):
            break
        options = []
        for g, c in curves.items():
            if plan[g] >= c.channels:
                continue
            up = _step_up(plan, g, c, pr.cfg.channel_multiple)
            trial = {**plan, g: up}
            pruned, macs, params, v = pr.prune(trial)
            if value < v <= target * (1 + tolerance):
                regained = c.at(plan[g])[0] - c.at(up)[0]
                options.append((-(regained + 1e-9) / (v - value), v, trial, pruned, macs, params))
        if not options:
            options = _swaps(pr, curves, plan, value, target=target, tolerance=tolerance)
        if not options:
            break
        _, v, trial, pruned, macs, params = min(options, key=lambda o: (o[0], -o[1]))
        trials.append({"refined": True, "achieved": round(v / base, 4)})
        cost = sum(curves[g].at(k)[0] for g, k in trial.items())
        best = (trial, pruned, v, macs, params, cost)
    return best


def _swaps(pr: _Pruner, curves: Mapping[str, _Curve], plan: Mapping[str, int], value: float, *, target: float,
           tolerance: float, tries: int = 10) -> list[tuple]:  # fmt: skip
    """One group a step up and another a step down: the pairs whose predicted result lands in the window,
    cheapest predicted loss first, measured for real (at most `tries`)."""
    m = pr.cfg.channel_multiple
    pairs = []
    for g, cg in curves.items():
        up = _step_up(plan, g, cg, m)
        if up == plan[g]:
            continue
        for h, ch in curves.items():
            down = plan[h] - m if plan[h] % m == 0 else plan[h] // m * m
            if h == g or down < max(1, int(np.ceil(ch.channels * (1 - pr.cfg.max_layer_ratio)))):
                continue
            d_value = (cg.at(plan[g])[1] - cg.at(up)[1]) - (ch.at(down)[1] - ch.at(plan[h])[1])
            predicted = value + d_value
            if value < predicted <= target * (1 + tolerance):
                d_cost = (cg.at(up)[0] - cg.at(plan[g])[0]) + (ch.at(down)[0] - ch.at(plan[h])[0])
                pairs.append((d_cost, {**plan, g: up, h: down}))
    out = []
    for d_cost, trial in sorted(pairs, key=lambda p: p[0])[:tries]:
        pruned, macs, params, v = pr.prune(trial)
        if value < v <= target * (1 + tolerance):
            out.append((d_cost / (v - value), v, trial, pruned, macs, params))
    return out


def _step_of(channels: int, multiple: int) -> int:
    """How many channels one allocation step removes from a group: an eighth of it, on the multiple."""
    return max(multiple, multiple * round(channels / 8 / multiple))


@dataclass
class _Walk:
    """Where the NetAdapt loop stands: the plan, its pruned model, its metric value and validation loss."""

    plan: dict[str, int]
    model: nn.Module
    value: float
    loss: float
    steps: list[dict[str, Any]]


def _descend(pr: _Pruner, curves: Mapping[str, _Curve], walk: _Walk, *, stop: float, base: float,
             candidates: int) -> _Walk:  # fmt: skip
    """Take NetAdapt steps from `walk` until its value is at most `stop`: of the `candidates` groups the curves
    rank cheapest, each tried one step smaller for real; the least loss per unit saved is taken. Every step's
    plan is kept in `walk.steps` (the path the accuracy search and iterative pruning walk along)."""
    cfg = pr.cfg
    floor = {g: max(1, int(np.ceil(c.channels * (1 - cfg.max_layer_ratio)))) for g, c in curves.items()}
    while walk.value > stop:
        options = []
        for g, c in curves.items():
            nxt = max(floor[g], walk.plan[g] - _step_of(c.channels, cfg.channel_multiple))
            nxt = nxt // cfg.channel_multiple * cfg.channel_multiple if nxt >= cfg.channel_multiple else nxt
            if nxt >= walk.plan[g] or nxt < floor[g]:
                continue
            c0, s0 = c.at(walk.plan[g])
            c1, s1 = c.at(nxt)
            options.append(((c1 - c0 + 1e-9) / max(s1 - s0, 1e-9), g, nxt))
        best = None
        for _, g, nxt in sorted(options)[:candidates]:
            pruned, loss, v = pr.measure({**walk.plan, g: nxt})
            score = (loss - walk.loss) / max(walk.value - v, 1e-9)
            if v < walk.value and (best is None or score < best[0]):
                best = (score, g, nxt, pruned, loss, v)
        if best is None:
            break
        _, g, nxt, walk.model, walk.loss, walk.value = best
        walk.plan[g] = nxt
        walk.steps.append({"group": g, "keep": nxt, "val_loss": round(walk.loss, 6),
                           "achieved": round(walk.value / base, 4), "plan": dict(walk.plan)})  # fmt: skip
    return walk


class SensitivityPath:
    """The NetAdapt path from the unpruned model down, walked on demand: `points` are (share of MACs or params
    kept, plan) after every step, in decreasing order of the share, starting with the unpruned model (1.0);
    `extend(down_to)` walks on from where it stopped."""

    def __init__(self, model: nn.Module, example: torch.Tensor, cfg: Pruning, sens: Mapping[str, Any], *,
                 val: Sequence[Batch], bn: Sequence[Batch], candidates: int = 3) -> None:  # fmt: skip
        self.pr = _Pruner(model, example, cfg, val, bn)
        self.curves = _curves(sens, self.pr.metric)
        macs0, params0 = count_macs_params(model, example)
        self.base = float(macs0 if self.pr.metric == "macs" else params0)
        self.walk = _Walk({g: c.channels for g, c in self.curves.items()}, model, self.base, sens["base"]["loss"], [])
        self.candidates = candidates
        self.ended = False  # no step left (every group at its floor)

    @property
    def points(self) -> list[tuple[float, dict[str, int]]]:
        full = {g: c.channels for g, c in self.curves.items()}
        return [(1.0, full)] + [(st["achieved"], st["plan"]) for st in self.walk.steps]

    def extend(self, down_to: float) -> list[tuple[float, dict[str, int]]]:
        if not self.ended and self.walk.value > down_to * self.base:
            before = len(self.walk.steps)
            _descend(self.pr, self.curves, self.walk, stop=down_to * self.base, base=self.base,
                     candidates=self.candidates)  # fmt: skip
            self.ended = self.walk.value > down_to * self.base or len(self.walk.steps) == before
        return self.points


def allocate(
    model: nn.Module,
    example: torch.Tensor,
    cfg: Pruning,
    sens: Mapping[str, Any],
    *,
    val: Sequence[Batch],
    bn: Sequence[Batch],
    tolerance: float = 0.02,
    candidates: int = 3,
) -> tuple[PruneResult, dict[str, Any]]:
    """Prune `model` to `cfg.target.keep` of its MACs (or params), one step at a time: of the `candidates`
    groups the sensitivity curves rank cheapest, each is tried one step smaller, pruned for real with
    BatchNorm re-estimated, and the step that raises the validation loss least per MAC (or param) saved is
    taken (NetAdapt's loop, with measured loss for accuracy). Stops at the target; if the last step went more
    than `tolerance` under it, channels are given back (`_refine`). The figures keep every step's plan."""
    metric, keep = cfg.target.metric, cfg.target.keep
    if metric not in ("macs", "params") or keep is None:
        raise PruningError("pruning.allocation: sensitivity allocates MAC or parameter targets (metric macs|params)")
    pr = _Pruner(model, example, cfg, val, bn)
    curves = _curves(sens, metric)
    macs0, params0 = count_macs_params(model, example)
    base = float(macs0 if metric == "macs" else params0)
    target = keep * base
    walk = _Walk({g: c.channels for g, c in curves.items()}, model, base, sens["base"]["loss"], [])
    _descend(pr, curves, walk, stop=target * (1 + tolerance), base=base, candidates=candidates)
    macs, params = count_macs_params(walk.model, example)
    best_t = (walk.plan, walk.model, walk.value, macs, params, walk.loss - sens["base"]["loss"])
    trials: list[dict[str, Any]] = []
    if walk.value < target * (1 - tolerance):
        best_t = _refine(pr, curves, best_t, target=target, tolerance=tolerance, trials=trials, base=base)
    if best_t[2] > target * (1 + tolerance):
        raise PruningError(
            f"cannot keep only {keep:.0%} of the {metric} within pruning.max_layer_ratio {cfg.max_layer_ratio} "
            f"(channel multiple {cfg.channel_multiple}); raise pruning.target.keep or pruning.max_layer_ratio"
        )
    plan, pruned, value, macs, params, cost = best_t
    result = PruneResult(model=pruned, metric=metric, keep_target=keep, keep_achieved=value / base,
                         channel_ratio=1 - sum(plan.values()) / max(1, sum(c.channels for c in curves.values())),
                         macs_before=macs0, macs_after=macs, params_before=params0, params_after=params,
                         layers=tuple(layer_channels(model, pruned)))  # fmt: skip
    within = abs(value / target - 1) <= tolerance
    figures = {"plan": plan, "steps": walk.steps, "refined": trials, "measured_trials": pr.trials,
               "val_loss_increase": round(cost, 6), "within_tolerance": within, "tolerance": tolerance}  # fmt: skip
    if not within:
        figures["why_not_within"] = (
            f"the channel multiple {cfg.channel_multiple} and max_layer_ratio {cfg.max_layer_ratio} leave no plan "
            f"within {tolerance:.0%} of {keep:.3f} of the {metric}; the closest found is {value / base:.3f}"
        )
    return result, figures
