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

The unpruned targets come from one forward pass per batch (only the sampled positions are kept), and the
pruned model runs once, all batches in lockstep (pipeline/pruning/lockstep.py), each layer refitted when the
pass reaches it; where that cannot run (untraceable, too large), each layer's input is captured by its own
forward pass instead, with the same result.

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
LOCKSTEP_BYTES = 4 << 30  # activations of all the refit's images held at once in the one-pass refit, at most


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


def _sample(n: int, g: torch.Generator, dev: torch.device) -> torch.Tensor | None:
    """ROWS of the `n` regression rows of one batch (seeded), or None: all of them."""
    return torch.randperm(n, generator=g)[:ROWS].to(dev) if n > ROWS else None


def _patches(layer: nn.Conv2d, x: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    """Rows of `F.unfold(x)` (positions ordered image, row, column; features channel-major, then kernel row and
    column), gathered only at the sampled positions: unfolding a whole batch first takes k*k times the input's
    memory (gigabytes for 32 images at 224x224) to keep 8192 rows of it."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = layer.kernel_size, layer.stride, layer.dilation, layer.padding
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    pos = torch.arange(n * ho * wo, device=x.device) if pick is None else pick
    img, rest = pos // (ho * wo), pos % (ho * wo)
    i, j = (rest // wo) * sh, (rest % wo) * sw
    xp = F.pad(x, (pw, pw, ph, ph))
    taps = [xp[img, :, i + a * dh, j + b * dw] for a in range(kh) for b in range(kw)]  # each (rows, channels)
    return torch.stack(taps, 2).reshape(len(pos), c * kh * kw)


def _features(layer: nn.Module, x: torch.Tensor, pick: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's input as rows of a regression: (positions, inputs [+ 1 for the bias]), only the rows `pick`
    names when given (indices into all the batch's rows, in the order of `_targets`)."""
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        rows = rows if pick is None else rows[pick]
    elif layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding in ((0, 0), "valid"):
        flat = x.flatten(2)  # (images, channels, positions): gathered without a permuted copy of the batch
        if pick is None:
            rows = flat.permute(0, 2, 1).reshape(-1, x.shape[1])
        else:
            rows = flat[pick // flat.shape[2], :, pick % flat.shape[2]]
    else:
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            raise NotImplementedError(f"refit of a convolution with padding {layer.padding!r}")
        rows = _patches(layer, x, pick)
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


Targets = list[tuple[torch.Tensor | None, torch.Tensor]]  # per batch: (rows sampled or None, their targets)


def _sampled_targets(y: torch.Tensor, linear: bool, kept_out: torch.Tensor | None, g: torch.Generator) -> tuple:
    y = _targets(y, linear)
    pick = _sample(len(y), g, y.device)
    y = y if pick is None else y[pick]
    return pick, (y if kept_out is None else y[:, kept_out.to(y.device)]).contiguous()


@torch.no_grad()
def unpruned_targets(unpruned: nn.Module, kept: Mapping[str, torch.Tensor | None], batches: Sequence[Batch],
                     dev: torch.device) -> dict[str, Targets]:  # fmt: skip
    """What the unpruned model's layers named in `kept` produce on every batch, only at the rows each layer's
    refit samples (the same seeded draw as `refit_layer`'s) and only for the channels it kept: one forward pass
    per batch for all the layers, where capturing them layer by layer reran the model once per layer."""
    gens = {name: torch.Generator().manual_seed(0) for name in kept}
    out: dict[str, Targets] = {name: [] for name in kept}
    seen = 0  # batches run so far: a layer called twice in one forward keeps its first call, as `_capture` does

    def hook_for(name: str, linear: bool):
        def hook(_m: nn.Module, _a: tuple, y: torch.Tensor) -> None:
            if len(out[name]) == seen:
                out[name].append(_sampled_targets(y.detach(), linear, kept[name], gens[name]))

        return hook

    layers = {n: unpruned.get_submodule(n) for n in kept}
    hooks = [m.register_forward_hook(hook_for(n, isinstance(m, nn.Linear))) for n, m in layers.items()]
    try:
        for x, _ in batches:
            unpruned(_on(x, dev))
            seen += 1
    finally:
        for h in hooks:
            h.remove()
    return out


class _Normal:
    """The normal equations of one layer's regression (X^T X, X^T Y, ||Y||^2), summed over batches in float64,
    and their ridge solution written into the layer."""

    def __init__(self, layer: nn.Module) -> None:
        w0 = layer.weight.reshape(layer.weight.shape[0], -1).double()
        if layer.bias is not None:
            w0 = torch.cat([w0, layer.bias.double()[:, None]], 1)
        self.layer, self.w0, self.dev = layer, w0, w0.device
        self.xtx = torch.zeros(w0.shape[1], w0.shape[1], dtype=torch.float64, device=self.dev)
        self.xty = torch.zeros(w0.shape[1], w0.shape[0], dtype=torch.float64, device=self.dev)
        self.yty = 0.0

    def add(self, rows: torch.Tensor, y: torch.Tensor) -> None:
        self.xtx += (rows.T @ rows).double()  # float32 products (fast), summed over batches in float64
        self.xty += (rows.T @ y).double()
        self.yty += float((y.double() ** 2).sum())

    @torch.no_grad()
    def solve(self, ridge: float) -> float:
        """Writes the refitted weights; returns the relative output error after (||Y - XW|| / ||Y||)."""
        xtx, xty, after = self.xtx, self.xty, self.layer
        lam = ridge * float(xtx.diagonal().mean()) + 1e-12
        eye = torch.eye(len(xtx), dtype=torch.float64, device=self.dev)
        w = torch.linalg.solve(xtx + lam * eye, xty + lam * self.w0.T).T
        # residual from the normal equations: ||Y||^2 - 2 tr(W X^T Y) + tr(W X^T X W^T)
        err = self.yty - 2 * float((w.T * xty).sum()) + float((w @ xtx * w).sum())
        if after.bias is not None:
            after.bias.copy_(w[:, -1].to(after.bias.dtype))
            w = w[:, :-1]
        after.weight.copy_(w.reshape(after.weight.shape).to(after.weight.dtype))
        return (max(err, 0.0) / max(self.yty, 1e-30)) ** 0.5


@torch.no_grad()
def refit_layer(unpruned: nn.Module, pruned: nn.Module, name: str, kept_out: torch.Tensor | None,
                batches: Sequence[Batch], *, ridge: float = RIDGE,
                targets: Targets | None = None) -> float:  # fmt: skip
    """Refit one layer of `pruned` in place, its input captured by running `pruned` up to it on each batch;
    returns the relative output error after (||Y - XW|| / ||Y||). `targets`: the unpruned layer's sampled
    outputs per batch (`unpruned_targets`), else captured here."""
    before, after = unpruned.get_submodule(name), pruned.get_submodule(name)
    eq = _Normal(after)
    g = torch.Generator().manual_seed(0)
    for b, (x, _) in enumerate(batches):
        if targets is None:
            out = _capture(unpruned, before, _on(x, eq.dev), output=True)
            pick, y = _sampled_targets(out, isinstance(after, nn.Linear), kept_out, g)
        else:
            pick, y = targets[b]  # the same positions in both (rows and targets line up one to one)
        eq.add(_features(after, _capture(pruned, after, _on(x, eq.dev), output=False), pick), y)
    return eq.solve(ridge)


def _refit_in_lockstep(pruned: nn.Module, todo: list[str], targets: dict[str, Targets], batches: Sequence[Batch],
                       dev: torch.device, ridge: float) -> dict[str, float]:  # fmt: skip
    """Every layer in `todo` refitted in one lockstep pass over the batches (pipeline/pruning/lockstep.py);
    raises LockstepSkipped where that cannot run (then nothing has been changed)."""
    from pipeline.pruning.lockstep import LockstepSkipped, run_lockstep, trace

    gm = trace(pruned)
    if any(gm.get_submodule(n) is not pruned.get_submodule(n) for n in todo):
        raise LockstepSkipped("the traced graph does not share the model's layers")
    errors: dict[str, float] = {}

    def visit(name: str, xs: list[torch.Tensor]) -> None:
        eq = _Normal(pruned.get_submodule(name))
        for x, (pick, y) in zip(xs, targets[name], strict=True):
            eq.add(_features(eq.layer, x, pick), y)
        errors[name] = round(eq.solve(ridge), 6)

    run_lockstep(gm, [_on(x, dev) for x, _ in batches], set(todo), visit, max_bytes=LOCKSTEP_BYTES)
    return errors


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
    from pipeline.pruning.lockstep import LockstepSkipped

    modules = dict(unpruned.named_modules())
    todo = [n for n in forward_order(pruned, example) if refittable(modules[n], pruned.get_submodule(n))]
    with _placed(None, unpruned, pruned):  # on the decision device when one is set (`decisions_on`)
        dev = next(pruned.parameters()).device
        targets = unpruned_targets(unpruned, {n: kept.get(n) for n in todo}, batches, dev)
        try:
            errors = _refit_in_lockstep(pruned, todo, targets, batches, dev, ridge) if todo else {}
        except LockstepSkipped as why:  # layer by layer: each layer's input captured by a forward pass
            log.info("refit layer by layer: %s", why)
            errors = {n: round(refit_layer(unpruned, pruned, n, kept.get(n), batches, ridge=ridge,
                                           targets=targets.pop(n)), 6) for n in todo}  # fmt: skip
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
