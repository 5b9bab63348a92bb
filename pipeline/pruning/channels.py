"""Structured channel pruning with Torch-Pruning's DepGraph, to a stated MAC or parameter target.

Torch-Pruning's `pruning_ratio` is a channel ratio; the profile asks for a fraction of MACs (or
parameters) to keep. We search the channel ratio by bisection on copies of the model, with channel
counts rounded to the target's channel multiple, and keep the least-pruned model that meets the target.
Coupled layers (residual adds, BN after conv, the classifier's input) stay consistent through DepGraph.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.errors import PruningError

if TYPE_CHECKING:
    from pipeline.targets import Pruning

log = logging.getLogger(__name__)

Metric = Literal["macs", "params"]


@dataclass(frozen=True)
class LayerChannels:
    name: str
    kind: str
    before: int
    after: int


@dataclass(frozen=True)
class PruneResult:
    model: nn.Module
    metric: Metric
    keep_target: float
    keep_achieved: float
    channel_ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    layers: tuple[LayerChannels, ...]

    def figures(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "keep_target": self.keep_target,
            "keep_achieved": round(self.keep_achieved, 4),
            "channel_ratio": round(self.channel_ratio, 4),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "layers": [vars(layer) for layer in self.layers],
        }


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs), int(params)


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The Linear/Conv layers whose output is the model's output (never pruned: they are the classes)."""
    with torch.no_grad():
        out = model.eval()(example)
    n_out = out.shape[-1] if out.ndim == 2 else out.shape[1]
    last = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n_out]
    if not last:
        last = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == n_out]
    return last[-1:]


def resolve_keep_layers(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    found = []
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise PruningError(f"pruning.keep_layers: the model has no layer {name!r}{hint}")
        found.append(modules[name])
    return found


GRADIENT_CRITERIA = ("taylor", "hessian")  # need gradients of the loss on validation batches
HESSIAN_SAMPLES = 64  # per-sample gradients for the Hessian criterion (one backward each)


def _importance(kind: str) -> tp.importance.Importance:
    match kind:
        case "l1":
            return tp.importance.GroupMagnitudeImportance(p=1)
        case "l2":
            return tp.importance.GroupMagnitudeImportance(p=2)
        case "taylor":
            return tp.importance.GroupTaylorImportance()
        case "lamp":
            return tp.importance.LAMPImportance(p=2)
        case "bn_scale":
            return tp.importance.BNScaleImportance()
        case "hessian":
            return tp.importance.GroupHessianImportance()
    raise PruningError(
        f"pruning.importance: unknown importance {kind!r}; valid: l1, l2, taylor, lamp, bn_scale, hessian"
    )


def _gradients(model: nn.Module, imp: tp.importance.Importance, kind: str, batches: Sequence[Any]) -> None:
    """Leave in `model` (and, for the Hessian criterion, in `imp`) the loss gradients the criterion reads."""
    if kind not in GRADIENT_CRITERIA:
        return
    if not batches:
        raise PruningError(f"pruning.importance: {kind} needs validation images to take gradients on")
    import torch.nn.functional as F

    model.eval()
    model.zero_grad()
    if kind == "hessian":
        imp.zero_grad()
        x = torch.cat([b[0] for b in batches])[:HESSIAN_SAMPLES]
        out = model(x)
        target = out.argmax(1).detach()  # the model's own answer: no labels needed
        for i in range(len(x)):
            model.zero_grad()
            F.cross_entropy(out[i : i + 1], target[i : i + 1]).backward(retain_graph=i < len(x) - 1)
            imp.accumulate_grad(model)
        return
    for x, y in batches:
        out = model(x)
        F.cross_entropy(out, y if y is not None else out.argmax(1).detach()).backward()


def _pruner(
    model: nn.Module,
    example: torch.Tensor,
    *,
    importance: str | tp.importance.Importance,
    keep_layers: Sequence[str],
    ratio_dict: dict[nn.Module, float] | None = None,
    global_ratio: float | None = None,
    max_ratio: float = 1.0,
    round_to: int | None = None,
) -> tp.pruner.MetaPruner:
    ignored = ignored_layers(model, example, keep_layers)
    imp = _importance(importance) if isinstance(importance, str) else importance
    try:
        return tp.pruner.MetaPruner(
            model,
            example,
            importance=imp,
            pruning_ratio=global_ratio or 0.0,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=ignored,
            global_pruning=global_ratio is not None,
            max_pruning_ratio=max_ratio,
            round_to=round_to,
        )
    except Exception as exc:  # Torch-Pruning raises bare errors for graphs it cannot trace
        raise PruningError(
            f"Torch-Pruning could not trace this model ({type(exc).__name__}: {exc}); add the layer it names "
            f"to pruning.keep_layers, or set pruning.enabled: false"
        ) from exc


def _out_groups(pruner: tp.pruner.MetaPruner, model: nn.Module) -> Iterator[tuple[str, Any]]:
    """(root layer name, group) for every output-channel group the pruner may cut."""
    names = {m: n for n, m in model.named_modules()}
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        if pruner.DG.is_out_channel_pruning_fn(group[0].dep.handler):
            yield names[group[0].dep.target.module], group


def prunable_groups(model: nn.Module, example: torch.Tensor, *, keep_layers: Sequence[str] = ()) -> dict[str, int]:
    """Each prunable group of coupled layers, named by its root layer, with its output channel count."""
    pruner = _pruner(model.eval(), example, importance="l2", keep_layers=keep_layers)
    return {
        name: int(pruner.DG.get_out_channels(group[0].dep.target.module)) for name, group in _out_groups(pruner, model)
    }


def group_importance(
    model: nn.Module, example: torch.Tensor, *, importance: str = "l2", keep_layers: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Per group, its channels' importance sorted ascending and scaled to sum to 1 (the order pruning cuts)."""
    pruner = _pruner(model.eval(), example, importance=importance, keep_layers=keep_layers)
    out = {}
    for name, group in _out_groups(pruner, model):
        imp = pruner.importance(group)
        scores = np.sort(imp.detach().double().numpy()) if imp is not None else np.zeros(0)
        total = scores.sum()
        out[name] = scores / total if total > 0 else np.full(len(scores), 1.0 / max(len(scores), 1))
    return out


def ignored_layers(model: nn.Module, example: torch.Tensor, keep_layers: Sequence[str] = ()) -> list[nn.Module]:
    """Layers the pruner leaves whole: the classifier and the profile's keep_layers."""
    return output_layers(model, example) + resolve_keep_layers(model, keep_layers)


def prune_to_plan(
    model: nn.Module,
    example: torch.Tensor,
    kept: Mapping[str, int],
    *,
    importance: str = "l2",
    keep_layers: Sequence[str] = (),
    batches: Sequence[Any] = (),
    groups: Mapping[str, int] | None = None,
) -> nn.Module:
    """A pruned copy of `model` in which each group root named in `kept` keeps that many channels.

    Which channels go is decided by the importance criterion, group-wise (all coupled layers together);
    `batches` ((images, labels) pairs) feed the gradient criteria (taylor, hessian). `groups`: the model's
    `prunable_groups`, when the caller has them (saves tracing the graph once more).
    """
    pruned = copy.deepcopy(model).eval()
    modules = dict(pruned.named_modules())
    groups = groups if groups is not None else prunable_groups(pruned, example, keep_layers=keep_layers)
    ratio_dict = {}
    for name, n_keep in kept.items():
        if name not in groups:
            raise PruningError(f"{name!r} is not the root of a prunable group; prunable: {', '.join(groups)}")
        total = groups[name]
        if not 1 <= n_keep <= total:
            raise PruningError(f"{name}: cannot keep {n_keep} of {total} channels")
        # Torch-Pruning keeps int(total * (1 - ratio)) channels; nudge so that float error cannot drop one.
        ratio_dict[modules[name]] = (total - n_keep) / total - 1e-6 if n_keep < total else 0.0
    return _step(pruned, example, importance, keep_layers, batches, ratio_dict=ratio_dict)


KEPT = "_edgeship_kept_outputs"  # attribute of a pruned model: {layer: output channels kept, in the unpruned one}


def _width(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.num_features if isinstance(layer, _BatchNorm) else layer.out_channels


def kept_outputs(pruned: nn.Module) -> dict[str, torch.Tensor]:
    """For each conv/linear/BatchNorm layer of `pruned` that lost output channels, the indices it kept in the
    layer of the model it was pruned from (through every pruning step since: they compose). Empty when unpruned."""
    return dict(getattr(pruned, KEPT, {}))


def _note_kept(pruned: nn.Module, before: Mapping[str, int], removed: Mapping[str, Sequence[int]]) -> None:
    """Compose this step's removed channels with those the model had already lost."""
    kept = kept_outputs(pruned)
    for name, gone in removed.items():
        drop = set(gone)
        here = torch.tensor([i for i in range(before[name]) if i not in drop], dtype=torch.long)
        kept[name] = kept[name][here] if name in kept else here
    object.__setattr__(pruned, KEPT, kept)


def prune_globally(
    model: nn.Module, example: torch.Tensor, ratio: float, cfg: Pruning, *, batches: Sequence[Any] = ()
) -> nn.Module:
    """A pruned copy of `model` with `ratio` of all prunable channels removed, ranked across layers by the
    importance criterion (Torch-Pruning's global pruning), channel counts rounded to the channel multiple."""
    pruned = copy.deepcopy(model).eval()
    return _step(pruned, example, cfg.importance, cfg.keep_layers, batches, global_ratio=ratio,
                 max_ratio=cfg.max_layer_ratio, round_to=cfg.channel_multiple)  # fmt: skip


def _step(pruned: nn.Module, example: torch.Tensor, importance: str, keep_layers: Sequence[str],
          batches: Sequence[Any], **pruner_args: Any) -> nn.Module:  # fmt: skip
    imp = _importance(importance)
    pruner = _pruner(pruned, example, importance=imp, keep_layers=keep_layers, **pruner_args)
    try:
        _gradients(pruned, imp, importance, batches)
        _recorded_step(pruner, pruned)
        pruned.zero_grad(set_to_none=True)
        with torch.no_grad():
            pruned(example)
    except PruningError:
        raise
    except Exception as exc:
        raise PruningError(_failure_message(pruned, example, exc)) from exc
    return pruned.eval()


def _recorded_step(pruner: tp.pruner.MetaPruner, pruned: nn.Module) -> None:
    """`pruner.step()`, noting in the model the output channels each conv/linear/BatchNorm layer keeps
    (`kept_outputs`; each layer's output dimension belongs to one group only: indices from before this step)."""
    layers = {m: n for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d | nn.Linear | _BatchNorm)}
    before = {n: _width(m) for m, n in layers.items()}
    removed: dict[str, list[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            layer = dep.target.module
            if layer in layers and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                removed[layers[layer]] = sorted(int(getattr(i, "idx", i)) for i in idxs)
        group.prune()
    _note_kept(pruned, before, removed)


def _failure_message(pruned: nn.Module, example: torch.Tensor, exc: Exception) -> str:
    """Name the layer whose forward raised after pruning, and the conv/linear that fed it (the one to keep)."""
    names = {m: n for n, m in pruned.named_modules() if n}
    stack: list[str] = []
    ran: list[str] = []

    def enter(module: nn.Module, args: object) -> None:
        stack.append(names[module])

    def leave(module: nn.Module, args: object, out: object) -> None:
        stack.pop()
        if isinstance(module, nn.Conv2d | nn.Linear):
            ran.append(names[module])

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    failed = None
    try:
        with torch.no_grad():
            pruned(example)
    except Exception:  # the same failure, now with the module stack at the moment it was raised
        failed = stack[-1] if stack else None
    finally:
        for h in hooks:
            h.remove()
    what = f"{type(exc).__name__}: {exc}"
    if failed is None:
        return f"pruning failed ({what}); set pruning.enabled: false, or keep the layers involved whole"
    kind = type(dict(pruned.named_modules())[failed]).__name__
    feeder = next((n for n in reversed(ran) if n != failed), None)
    keep = f"add {feeder!r} (the layer that feeds it) to pruning.keep_layers" if feeder else "keep its inputs whole"
    return (
        f"pruning failed in layer {failed!r} ({kind}): {what}. This layer assumes channel counts Torch-Pruning "
        f"cannot change; {keep}, or set pruning.enabled: false"
    )


def uniform_plan(groups: Mapping[str, int], keep_fraction: float, *, multiple: int, max_ratio: float) -> dict[str, int]:
    """Keep `keep_fraction` of every group's channels, rounded to the nearest multiple, within bounds."""
    plan = {}
    for name, total in groups.items():
        floor = max(min(multiple, total), math.ceil(total * (1 - max_ratio)))
        want = round(total * keep_fraction / multiple) * multiple
        plan[name] = int(min(total, max(floor, want)))
    return plan


def prune_to_target(
    model: nn.Module, example: torch.Tensor, cfg: Pruning, *, batches: Sequence[Any] = (), iterations: int = 12
) -> PruneResult:
    """The least-pruned model whose MACs (or params) are at most `cfg.target.keep` of the original.

    Bisection on one channel-keep fraction: shared by every group (channel counts on multiples of
    `cfg.channel_multiple`, rounded to the nearest so that the steps of different layers interleave), or, with
    `cfg.global_pruning`, the share of all channels kept, ranked across layers by importance. `batches` feed
    the gradient criteria.
    """
    metric, keep = cfg.target.metric, cfg.target.keep
    if metric == "latency" or keep is None:
        raise PruningError("pruning.target: prune_to_target needs metric macs or params with keep; "
                           "latency budgets go through pipeline.pruning.latency.prune_to_latency")  # fmt: skip
    channel_multiple, max_ratio = cfg.channel_multiple, cfg.max_layer_ratio
    importance, keep_layers = cfg.importance, cfg.keep_layers
    model = model.eval()
    macs0, params0 = count_macs_params(model, example)
    base = macs0 if metric == "macs" else params0
    groups = prunable_groups(model, example, keep_layers=keep_layers)

    def attempt(fraction: float) -> tuple[nn.Module, int, int, float]:
        if cfg.global_pruning:
            pruned = prune_globally(model, example, 1.0 - fraction, cfg, batches=batches)
        else:
            plan = uniform_plan(groups, fraction, multiple=channel_multiple, max_ratio=max_ratio)
            pruned = prune_to_plan(model, example, plan, importance=importance, keep_layers=keep_layers,
                                   batches=batches)  # fmt: skip
        macs, params = count_macs_params(pruned, example)
        return pruned, macs, params, (macs if metric == "macs" else params) / base

    if keep >= 1.0 or not groups:
        best = (1.0, copy.deepcopy(model), macs0, params0, 1.0)
    else:
        lo, hi = 1.0 - max_ratio, 1.0
        pruned, macs, params, frac = attempt(lo)
        if frac > keep:
            raise PruningError(
                f"cannot keep only {keep:.0%} of the {metric}: pruning {max_ratio:.0%} of every group's channels "
                f"(channel multiple {channel_multiple}) still keeps {frac:.1%}; raise pruning.target.keep, "
                f"lower pruning.channel_multiple, or raise pruning.max_layer_ratio"
            )
        best = (lo, pruned, macs, params, frac)
        for _ in range(iterations):
            mid = (lo + hi) / 2
            pruned, macs, params, frac = attempt(mid)
            log.debug("keep fraction %.4f keeps %.4f of %s", mid, frac, metric)
            if frac <= keep:
                lo = mid
                best = (mid, pruned, macs, params, frac)
            else:
                hi = mid
    fraction, pruned, macs1, params1, frac = best
    return PruneResult(
        model=pruned,
        metric=metric,
        keep_target=keep,
        keep_achieved=frac,
        channel_ratio=1.0 - fraction,
        macs_before=macs0,
        macs_after=macs1,
        params_before=params0,
        params_after=params1,
        layers=tuple(layer_channels(model, pruned)),
    )


def layer_channels(before: nn.Module, after: nn.Module) -> list[LayerChannels]:
    """Output channels of every conv/linear layer, before and after pruning."""
    after_mods = dict(after.named_modules())
    rows = []
    for name, m in before.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            a = after_mods[name]
            kind = "linear" if isinstance(m, nn.Linear) else ("depthwise" if m.groups > 1 else "conv")
            out_before = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            out_after = a.out_features if isinstance(a, nn.Linear) else a.out_channels
            rows.append(LayerChannels(name, kind, out_before, out_after))
    return rows


def conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def describe(original: nn.Module, pruned: nn.Module, example: torch.Tensor, *, metric: Metric, keep_target: float,
             base: tuple[int, int] | None = None) -> PruneResult:  # fmt: skip
    """`pruned` described against `original` (`base`: the original's (MACs, params), when already counted)."""
    macs0, params0 = base or count_macs_params(original, example)
    macs, params = count_macs_params(pruned, example)
    value, whole = (macs, macs0) if metric == "macs" else (params, params0)
    return PruneResult(model=pruned, metric=metric, keep_target=keep_target, keep_achieved=value / whole,
                       channel_ratio=1 - conv_channels(pruned) / max(conv_channels(original), 1),
                       macs_before=macs0, macs_after=macs, params_before=params0, params_after=params,
                       layers=tuple(layer_channels(original, pruned)))  # fmt: skip
