"""Least-squares reconstruction of the layers that read pruned channels (data-efficient recovery).

Pruning a group removes input channels of the layers that consume it (an inverted residual's 1x1 projection,
the next block's expansion, the head, the classifier). What those layers then compute is no longer what the
unpruned model computed there. Before any fine-tuning, each such layer can be refitted, in forward order, so
that its output on a few hundred images matches the unpruned layer's output for the channels it kept:

    min_W ||Y_unpruned - X_pruned W||^2 + lam ||W - W_0||^2

where X_pruned is what the layer now receives (from the pruned model, with the earlier layers already
refitted, so errors do not add up), Y_unpruned what the unpruned layer produced, and W_0 its own weights
restricted to the kept channels (the ridge pulls towards them where the data say little: a classifier with
more inputs than images). No labels are needed, so it works on unlabelled photos, and it solves in seconds:
each layer is a linear regression over every spatial position of every image (1x1 convolutions and linear
layers exactly; k x k convolutions through their patches). This is the feature-map reconstruction step of
channel pruning (He et al. 2017, ThiNet), done with the normal equations.

Depthwise and grouped layers are not refitted: their inputs and outputs are pruned together, channel by channel.
Once every mixing layer computes (nearly) what it did before, each BatchNorm sees what it saw in the unpruned
model, so its statistics are put back to the unpruned ones for the channels it kept (re-estimating them on a
few hundred images instead was measured worse on the EfficientNet-Lite0 photo set: BENCHMARKS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.pruning.calibrate import Batch, _on, _placed, recalibrate_bn

if TYPE_CHECKING:
    from pipeline.targets import Pruning

log = logging.getLogger(__name__)

RIDGE = 1e-3  # lam, relative to the mean diagonal of X^T X
ROWS = 8192  # spatial positions sampled per batch and layer (seeded): enough for a well-posed fit, and fast


class _Stop(Exception):
    """Raised by a hook once the layer of interest has been reached (the rest of the forward is not needed)."""


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the conv/linear layers in the order a forward pass runs them."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _a: order.append(names[mod])) for m in names]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def refittable(before: nn.Module, after: nn.Module) -> bool:
    """A layer whose inputs were pruned and whose weights mix channels (not depthwise or grouped)."""
    if isinstance(after, nn.Linear):
        return after.in_features < before.in_features
    return isinstance(after, nn.Conv2d) and after.groups == 1 and after.in_channels < before.in_channels


def _features(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of a regression: (positions, inputs [+ 1 for the bias])."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    elif layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid"):
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    else:
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise NotImplementedError(f"refit of a convolution with padding {layer.padding!r}")
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if layer.bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], 1)
    return rows


def _targets(y: torch.Tensor, linear: bool) -> torch.Tensor:
    return y.reshape(-1, y.shape[-1]) if linear else y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    """The input (or output) of `layer` when `model` runs on `x`; the forward stops there."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, out: torch.Tensor | None = None) -> None:
        got.append((out if output else args[0]).detach())
        raise _Stop

    h = layer.register_forward_hook(hook) if output else layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


@torch.no_grad()
def refit_layer(unpruned: nn.Module, pruned: nn.Module, name: str, kept_out: torch.Tensor | None,
                batches: Sequence[Batch], *, ridge: float = RIDGE) -> float:  # fmt: skip
    """Refit one layer of `pruned` in place; returns the relative output error after (||Y - XW|| / ||Y||)."""
    before, after = unpruned.get_submodule(name), pruned.get_submodule(name)
    linear = isinstance(after, nn.Linear)
    w0 = after.weight.reshape(after.weight.shape[0], -1).double()
    if after.bias is not None:
        w0 = torch.cat([w0, after.bias.double()[:, None]], 1)
    dev = w0.device
    xtx = torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64, device=dev)
    xty = torch.zeros(w0.shape[1], w0.shape[0], dtype=torch.float64, device=dev)
    yty = 0.0
    g = torch.Generator().manual_seed(0)
    for x, _ in batches:
        rows = _features(after, _capture(pruned, after, _on(x, dev), output=False))
        y = _targets(_capture(unpruned, before, _on(x, dev), output=True), linear)
        if kept_out is not None:
            y = y[:, kept_out.to(dev)]
        if len(rows) > ROWS:  # the same positions in both (rows and targets line up one to one)
            pick = torch.randperm(len(rows), generator=g)[:ROWS].to(dev)
            rows, y = rows[pick], y[pick]
        xtx += (rows.T @ rows).double()  # float32 products (fast), summed over batches in float64
        xty += (rows.T @ y).double()
        yty += float((y.double() ** 2).sum())
    lam = ridge * float(xtx.diagonal().mean()) + 1e-12
    eye = torch.eye(len(xtx), dtype=torch.float64, device=dev)
    w = torch.linalg.solve(xtx + lam * eye, xty + lam * w0.T).T
    # residual from the normal equations: ||Y||^2 - 2 tr(W X^T Y) + tr(W X^T X W^T)
    err = yty - 2 * float((w.T * xty).sum()) + float((w @ xtx * w).sum())
    if after.bias is not None:
        after.bias.copy_(w[:, -1].to(after.bias.dtype))
        w = w[:, :-1]
    after.weight.copy_(w.reshape(after.weight.shape).to(after.weight.dtype))
    return (max(err, 0.0) / max(yty, 1e-30)) ** 0.5


@torch.no_grad()
def restore_bn_stats(unpruned: nn.Module, pruned: nn.Module, kept: Mapping[str, torch.Tensor]) -> int:
    """The unpruned model's BatchNorm running statistics, for the channels each pruned BatchNorm kept. Returns
    how many BatchNorm layers were restored."""
    n = 0
    for name, layer in pruned.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            src = unpruned.get_submodule(name)
            idx = kept.get(name, torch.arange(src.num_features))
            if len(idx) != layer.num_features or src.running_mean is None:
                continue  # no record of which channels it kept: leave it as it is
            layer.running_mean.copy_(src.running_mean[idx])
            layer.running_var.copy_(src.running_var[idx])
            n += 1
    return n


def reconstruct(unpruned: nn.Module, pruned: nn.Module, kept: Mapping[str, torch.Tensor], example: torch.Tensor,
                batches: Sequence[Batch], *, ridge: float = RIDGE) -> dict[str, float]:  # fmt: skip
    """Refit, in forward order, every layer of `pruned` whose inputs were pruned (see the module docstring).

    `kept`: for each layer whose output channels were pruned, the indices (in the unpruned layer) it kept
    (`pipeline.pruning.channels.kept_outputs`). `batches`: training images (labels unused). BatchNorm statistics
    are first put back to the unpruned model's (`restore_bn_stats`). Returns each refitted layer's relative
    output error. Both models are left in eval mode; `pruned` is changed in place."""
    unpruned.eval(), pruned.eval()
    restore_bn_stats(unpruned, pruned, kept)
    modules = dict(unpruned.named_modules())
    errors = {}
    order = forward_order(pruned, example)
    with _placed(None, unpruned, pruned):  # on the decision device when one is set (`decisions_on`)
        for name in order:
            if refittable(modules[name], pruned.get_submodule(name)):
                errors[name] = round(refit_layer(unpruned, pruned, name, kept.get(name), batches, ridge=ridge), 6)
    log.info("refitted %d layers by least squares (median relative error %.3f)", len(errors),
             sorted(errors.values())[len(errors) // 2] if errors else 0.0)  # fmt: skip
    return errors


def recovery_name(cfg: Pruning) -> str:
    if cfg.reconstruct:
        return "least-squares refit"
    return "BatchNorm re-estimated" if cfg.recalibrate_bn else "none"


def recover(unpruned: nn.Module, pruned: nn.Module, cfg: Pruning, example: torch.Tensor,
            batches: Sequence[Batch]) -> dict[str, Any]:  # fmt: skip
    """What follows a pruning step, in place: the least-squares refit (`cfg.reconstruct`), else BatchNorm
    re-estimation (`cfg.recalibrate_bn`), else nothing. Returns a record for the report."""
    from pipeline.pruning.channels import kept_outputs

    if cfg.reconstruct:
        errors = reconstruct(unpruned, pruned, kept_outputs(pruned), example, batches)
        worst = max(errors, key=errors.__getitem__) if errors else None
        return {"recovery": recovery_name(cfg), "refitted_layers": len(errors),
                "median_relative_error": sorted(errors.values())[len(errors) // 2] if errors else 0.0,
                "worst_layer": worst, "images": sum(len(b[0]) for b in batches)}  # fmt: skip
    if cfg.recalibrate_bn:
        recalibrate_bn(pruned, batches)
    return {"recovery": recovery_name(cfg), "images": sum(len(b[0]) for b in batches)}
