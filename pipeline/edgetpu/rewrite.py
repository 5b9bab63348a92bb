"""Exact rewrites of a PyTorch model that keep it on the Edge TPU, applied before the ONNX export.

Each construct below converts (onnx2tf 1.29, full int8, uint8 I/O) into ops the Edge TPU cannot run, and has a
rewrite that computes the same numbers; measured here with the analysis of pipeline.edgetpu on the real
converted files:

- `nn.Conv2d(groups=g)` with 1 < g < in_channels: a grouped CONV_2D, op version 6, which edgetpu_compiler 16
  cannot parse (the whole model is refused) and the analysis puts on the CPU. Rewritten as `torch.split` +
  g convolutions + `torch.cat`: STRIDED_SLICE, CONV_2D version 3, CONCATENATION, all mapped. (groups ==
  in_channels becomes DEPTHWISE_CONV_2D, which maps, and is left alone.)
- `nn.Hardsigmoid`: MUL + ADD + RELU_0_TO_1, and RELU_0_TO_1 is not in the Edge TPU's op table. Rewritten as
  `relu6(x + 3) * (1/6)`, which is what ATen computes (up to the last bit of the division): mapped.
- reflect / replicate / circular padding (`nn.ReflectionPad2d`, `nn.ReplicationPad2d`, `nn.CircularPad2d`, or
  `nn.Conv2d(padding_mode=...)`): MIRROR_PAD, not in the table. Rewritten as slices + `torch.cat` (the same
  values moved, nothing computed): STRIDED_SLICE + CONCATENATION, mapped.

Layers the analysis flags that have no exact rewrite (nn.GELU, nn.ELU, ...) are left as they are and listed
as suggestions: replacing them changes the numbers, so the user decides and fine-tunes.

Every rewrite is checked as it is made: the new layer against the old one on seeded random inputs of the shape
it gets in the model, then the whole rewritten model against the original. A max |diff| above
`TOLERANCE` x max(1, max |output|) refuses the rewrite with an ExportError (nothing is exported).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.edgetpu.rules import OP_HINTS
from pipeline.errors import ExportError

TOLERANCE = 1e-5
N_RANDOM = 4  # random inputs per check
_PAD_MODULES = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate", nn.CircularPad2d: "circular"}

# Layers with no exact rewrite: what to change (the numbers change, so the user fine-tunes).
SUGGESTIONS: dict[type[nn.Module], str] = {
    nn.GELU: OP_HINTS["GELU"] + " (onnx2tf turns its Erf into float ops the int8 model and compiler 16 refuse)",
    nn.ELU: OP_HINTS["ELU"],
    nn.CELU: "nn.CELU becomes ELU, which the Edge TPU lacks: use nn.ReLU and fine-tune",
    nn.SELU: "nn.SELU becomes ELU-like float ops the Edge TPU lacks: use nn.ReLU and fine-tune",
    nn.Softplus: "nn.Softplus needs EXP/LOG, which the Edge TPU lacks: use nn.ReLU and fine-tune",
    nn.Mish: "nn.Mish needs EXP/LOG/TANH of float values: use nn.ReLU6 or nn.SiLU (LOGISTIC + MUL map) and fine-tune",
    nn.PixelShuffle: OP_HINTS["DEPTH_TO_SPACE"] + " (it becomes a 6-D RESHAPE the Edge TPU cannot map)",
}


@dataclass(frozen=True)
class Rewrite:
    """One layer rewritten: what it was, what it became, and how far apart the two are on random inputs."""

    kind: str  # grouped-conv-split | hardsigmoid-relu6 | pad-as-slices
    layer: str  # dotted module name in the model
    before: str
    after: str
    max_abs_diff: float


@dataclass(frozen=True)
class Suggestion:
    """A layer the Edge TPU cannot run that has no exact rewrite."""

    layer: str
    layer_type: str
    what_to_change: str


@dataclass(frozen=True)
class RewriteReport:
    applied: tuple[Rewrite, ...]
    suggestions: tuple[Suggestion, ...]
    model_max_abs_diff: float  # whole model, rewritten vs original, on random inputs (0.0 when nothing changed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "applied": [asdict(r) for r in self.applied],
            "suggestions": [asdict(s) for s in self.suggestions],
            "model_max_abs_diff": self.model_max_abs_diff,
            "tolerance": TOLERANCE,
        }


# ----------------------------------------------------------------------------------------- the new layers


class SlicePad2d(nn.Module):
    """Reflect / replicate / circular padding of the last two dims built from slices and torch.cat."""

    def __init__(self, pads: tuple[int, int, int, int], mode: str) -> None:
        super().__init__()
        self.pads, self.mode = tuple(int(p) for p in pads), mode  # (left, right, top, bottom) as in F.pad

    def _side(self, x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
        n = x.shape[dim]
        if self.mode == "reflect":
            lo = [x.narrow(dim, k, 1) for k in range(before, 0, -1)]
            hi = [x.narrow(dim, n - 1 - k, 1) for k in range(1, after + 1)]
        elif self.mode == "replicate":
            lo, hi = [x.narrow(dim, 0, 1)] * before, [x.narrow(dim, n - 1, 1)] * after
        else:  # circular
            lo = [x.narrow(dim, n - before, before)] if before else []
            hi = [x.narrow(dim, 0, after)] if after else []
        return torch.cat([*lo, x, *hi], dim=dim) if lo or hi else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.pads
        return self._side(self._side(x, 3, left, right), 2, top, bottom)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, mode={self.mode!r}"


class SplitConv2d(nn.Module):
    """A grouped convolution as one convolution per group on its slice of the channels, concatenated."""

    def __init__(self, convs: list[nn.Conv2d]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.split = convs[0].in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.split, dim=1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, parts, strict=True)], dim=1)


class Relu6Hardsigmoid(nn.Module):
    """hardsigmoid(x) = relu6(x + 3) / 6, as ADD, RELU6 and MUL."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) * (1.0 / 6.0)


# ------------------------------------------------------------------------------------------------ rules


def _is_grouped(m: nn.Conv2d) -> bool:
    return 1 < m.groups < m.in_channels


def _plain_conv(m: nn.Conv2d, *, groups: int = 1, padding: Any = None) -> nn.Conv2d:
    """A zero-padded copy of `m`'s settings (weights not copied), `groups` and `padding` as given."""
    return nn.Conv2d(
        m.in_channels // (m.groups // groups), m.out_channels // (m.groups // groups), m.kernel_size,
        stride=m.stride, padding=m.padding if padding is None else padding, dilation=m.dilation, groups=groups,
        bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype,
    )  # fmt: skip


def _split_groups(m: nn.Conv2d, padding: Any = None) -> SplitConv2d:
    out_g = m.out_channels // m.groups
    convs = []
    for g in range(m.groups):
        conv = _plain_conv(m, padding=padding)
        with torch.no_grad():
            conv.weight.copy_(m.weight[g * out_g : (g + 1) * out_g])
            if m.bias is not None:
                conv.bias.copy_(m.bias[g * out_g : (g + 1) * out_g])
        convs.append(conv)
    return SplitConv2d(convs)


def _unpadded(m: nn.Conv2d) -> nn.Module:
    """`m` with its non-zero padding taken out into a SlicePad2d (and its groups split when grouped)."""
    pads = tuple(m._reversed_padding_repeated_twice)  # (left, right, top, bottom), what nn.Conv2d pads with
    if _is_grouped(m):
        conv: nn.Module = _split_groups(m, padding=0)
    else:
        conv = _plain_conv(m, groups=m.groups, padding=0)
        conv.load_state_dict(m.state_dict())
    return nn.Sequential(SlicePad2d(pads, m.padding_mode), conv)


def _describe_conv(m: nn.Conv2d) -> str:
    pad = "" if m.padding_mode == "zeros" else f", padding_mode={m.padding_mode!r}"
    return f"Conv2d({m.in_channels}, {m.out_channels}, kernel_size={tuple(m.kernel_size)}, groups={m.groups}{pad})"


def _conv_rewrite(m: nn.Module) -> tuple[str, nn.Module, str] | None:
    if not isinstance(m, nn.Conv2d):
        return None
    padded = m.padding_mode != "zeros" and any(m._reversed_padding_repeated_twice)
    if padded:
        new = _unpadded(m)
        what = f"slices + torch.cat ({m.padding_mode} padding) then "
        what += f"{m.groups} x Conv2d + torch.cat" if _is_grouped(m) else "Conv2d(padding=0)"
        return ("pad-as-slices" + ("+grouped-conv-split" if _is_grouped(m) else ""), new, what)
    if _is_grouped(m):
        per = f"Conv2d({m.in_channels // m.groups}, {m.out_channels // m.groups})"
        return "grouped-conv-split", _split_groups(m), f"torch.split + {m.groups} x {per} + torch.cat"
    return None


def _other_rewrite(m: nn.Module) -> tuple[str, nn.Module, str] | None:
    if isinstance(m, nn.Hardsigmoid):
        return "hardsigmoid-relu6", Relu6Hardsigmoid(), "relu6(x + 3) * (1/6)"
    mode = _PAD_MODULES.get(type(m))
    if mode is not None and isinstance(m, nn.Module):
        pads = tuple(int(p) for p in m.padding)  # type: ignore[attr-defined]
        if len(pads) == 4:
            return "pad-as-slices", SlicePad2d(pads, mode), f"slices + torch.cat ({mode} padding {pads})"
    return None


RULES: tuple[Callable[[nn.Module], tuple[str, nn.Module, str] | None], ...] = (_conv_rewrite, _other_rewrite)


# ------------------------------------------------------------------------------------------------ checks


def _max_diff(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref|, the allowed max: TOLERANCE x max(1, max |ref|))."""
    if ref.shape != got.shape:
        return float("inf"), 0.0
    diff = float((got.double() - ref.double()).abs().max()) if ref.numel() else 0.0
    return diff, TOLERANCE * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)


def _input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape of every module, from one forward pass (the first call of a module called twice)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(m: nn.Module, args: tuple[Any, ...]) -> None:  # returns None: the inputs stay as they are
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [mod.register_forward_pre_hook(record(name)) for name, mod in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _check_layer(name: str, old: nn.Module, new: nn.Module, shape: tuple[int, ...], kind: str,
                 gen: torch.Generator) -> float:  # fmt: skip
    x = torch.randn((N_RANDOM, *shape[1:]), generator=gen) * 3.0  # covers the bends of relu6/hardsigmoid
    with torch.no_grad():
        diff, allowed = _max_diff(old(x), new(x))
    if not diff <= allowed:
        raise ExportError(
            f"layer {name!r} ({type(old).__name__}): the Edge TPU rewrite {kind} changes its output by {diff:.3g} "
            f"(allowed {allowed:.3g}) on random inputs, so it was not applied; replace the layer in PyTorch as the "
            "Edge TPU section of the report suggests, or report this layer's settings as a bug"
        )
    return diff


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ------------------------------------------------------------------------------------------------ entry


def suggestions(model: nn.Module) -> tuple[Suggestion, ...]:
    """Layers with no exact rewrite that the Edge TPU cannot run, with what to change."""
    out = []
    for name, m in model.named_modules():
        hint = next((h for t, h in SUGGESTIONS.items() if isinstance(m, t)), None)
        if hint is not None and name:
            out.append(Suggestion(name, type(m).__name__, hint))
    return tuple(out)


def suggestions_text(rewrites: Mapping[str, Any] | None) -> str:
    """For an error message: the layers the Edge TPU cannot run that no exact rewrite replaces, or ""."""
    rows = (rewrites or {}).get("suggestions") or []
    if not rows:
        return ""
    return " Layers the Edge TPU cannot run and no exact rewrite replaces: " + "; ".join(
        f"`{r['layer']}` ({r['layer_type']}): {r['what_to_change']}" for r in rows
    )


def rewrite_for_edgetpu(model: nn.Module, example: torch.Tensor, *, seed: int = 0) -> tuple[nn.Module, RewriteReport]:
    """A rewritten copy of `model` (left untouched) with every exact Edge TPU rewrite applied, and the report.

    `example` is one input (1, C, H, W). Raises ExportError when a rewrite (or all of them together) changes
    the output beyond TOLERANCE on random inputs.
    """
    original = model
    model = copy.deepcopy(model).eval()
    shapes = _input_shapes(model, example)
    gen = torch.Generator().manual_seed(seed)
    applied: list[Rewrite] = []
    for name, m in list(model.named_modules()):
        if not name or name not in shapes or any(name.startswith(r.layer + ".") for r in applied):
            continue
        bn = _batchnorm_after(model, name) if isinstance(m, nn.Conv2d) and _is_grouped(m) else None
        found = next((got for rule in RULES if (got := rule(_fold(m, bn[1]) if bn else m)) is not None), None)
        if found is None:
            continue
        kind, new, after = found
        new.train(m.training)
        old = nn.Sequential(m, bn[1]) if bn else m
        diff = _check_layer(name, old, new, shapes[name], kind, gen)
        before = _describe_conv(m) if isinstance(m, nn.Conv2d) else repr(m)
        _set_module(model, name, new)
        if bn:
            _set_module(model, bn[0], nn.Identity())
            before, after = f"{before} + BatchNorm2d `{bn[0]}`", f"{after} (BatchNorm2d `{bn[0]}` folded in)"
        applied.append(Rewrite(kind, name, before, after, diff))
    total = _check_model(original, model, example, gen) if applied else 0.0
    return model, RewriteReport(tuple(applied), suggestions(model), total)


def _batchnorm_after(model: nn.Module, name: str) -> tuple[str, nn.BatchNorm2d] | None:
    """(name, module) of the BatchNorm2d right after layer `name` in the same nn.Sequential, if any. A split
    grouped conv ends in a concatenation, so the converter can no longer fold that BatchNorm into it: folded
    here, the per-group convs quantize like the grouped one (a separate int8 MUL/ADD costs agreement)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    nxt = keys[keys.index(child) + 1] if keys.index(child) + 1 < len(keys) else None
    bn = parent._modules.get(nxt) if nxt is not None else None
    if type(bn) is not nn.BatchNorm2d or bn.training or not bn.track_running_stats:
        return None
    return (f"{parent_name}.{nxt}" if parent_name else nxt), bn


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of `conv` with `bn` (eval mode) folded into its weights and bias."""
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        folded.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
        folded.bias = nn.Parameter(bias * scale + shift)
    return folded


def _check_model(original: nn.Module, model: nn.Module, example: torch.Tensor, gen: torch.Generator) -> float:
    was = original.training
    original.eval()
    x = torch.randn((N_RANDOM, *example.shape[1:]), generator=gen)
    try:
        with torch.no_grad():
            diff, allowed = _max_diff(original(x), model(x))
    finally:
        original.train(was)
    if not diff <= allowed:
        raise ExportError(
            f"the Edge TPU rewrites change the model's output by {diff:.3g} (allowed {allowed:.3g}) on random "
            "inputs, so none was applied; replace the layers in PyTorch as the report suggests"
        )
    return diff
