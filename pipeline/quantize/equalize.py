"""Remedy (b): cross-layer equalization and bias correction, in PyTorch, before export.

1. BatchNorm folded into the convolution before it (`torch.fx.experimental.optimization.fuse`), so the
   weights equalized are the weights TFLite quantizes.
2. Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): for each pair conv A -> [ReLU /
   LeakyReLU / nothing] -> conv or linear B where A's output feeds only B, output channel c of A is divided by
   s_c = sqrt(r1_c / r2_c) and B's input channel c multiplied by it (r1_c = max |A weight of channel c|,
   r2_c = max |B weights reading channel c|). ReLU is positively homogeneous, so the float model computes the
   same function, while both layers' per-channel ranges become sqrt(r1_c r2_c): a depthwise channel with a
   1000x wider range no longer sets the scale of the whole activation tensor. Four sweeps over the pairs.
   Branches concatenated along channels count too: A -> [ReLU] -> [x k] -> cat -> B pairs A with the slice of
   B's input channels it fills (TFLite gives a concat's inputs one shared scale, so a branch with a 30x
   smaller range would keep only a few int8 levels). A positive constant scale after a homogeneous op is
   first folded into A (relu(z) * k == relu(k z)), so the weights see the range the activation has.
3. Bias correction: the expected output shift caused by rounding the weights to TFLite's per-channel int8
   grid, E[conv(x, W_q - W)] per output channel over the calibration images (float inputs), is subtracted
   from each Conv/Linear bias.

A model that torch.fx cannot trace (data-dependent control flow) cannot be equalized: `EqualizeSkipped`.
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.hooks import run_hooked
from pipeline.quantize.scheme import fake_quant_weight

log = logging.getLogger(__name__)

SWEEPS = 4
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)
HOMOGENEOUS_FN = (torch.relu, nn.functional.relu)


class EqualizeSkipped(Exception):
    """The model cannot be equalized (the reason is the message)."""


@dataclass(frozen=True)
class EqualizeRecord:
    pairs: tuple[tuple[str, str], ...]  # (A, B) module names equalized
    bias_corrected: int
    max_range_ratio_before: float  # worst max/min per-channel weight range over the A layers
    max_range_ratio_after: float
    scales_folded: int = 0  # positive constant scales after a ReLU folded into the conv before

    def to_dict(self) -> dict:
        return {
            "pairs": [list(p) for p in self.pairs],
            "bias_corrected": self.bias_corrected,
            "max_range_ratio_before": self.max_range_ratio_before,
            "max_range_ratio_after": self.max_range_ratio_after,
            "scales_folded": self.scales_folded,
        }


def _fold(model: nn.Module) -> torch.fx.GraphModule:
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        return fuse(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, NotImplementedError ...
        raise EqualizeSkipped(f"torch.fx cannot trace the model ({type(exc).__name__}: {exc})") from exc


def _is_homogeneous(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), HOMOGENEOUS)
    return node.op == "call_function" and node.target in HOMOGENEOUS_FN


def _weighted(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    return mod if isinstance(mod, (nn.Conv2d, nn.Linear)) else None


def _positive_scalar(node: torch.fx.Node) -> float | None:
    """k when `node` is x * k (or k * x) with a positive Python number k."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
        return None
    k = next((a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)), None)
    return float(k) if k is not None and k > 0 else None


def fold_scales(gm: torch.fx.GraphModule) -> int:
    """Fold conv A -> homogeneous op -> x k (k > 0, A's output used only there) into A's weights and bias.
    Returns the number folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        k = _positive_scalar(node)
        src = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
        if k is None or src is None or not _is_homogeneous(gm, src) or len(src.users) != 1:
            continue
        conv_node = src.args[0] if src.args and isinstance(src.args[0], torch.fx.Node) else None
        a = _weighted(gm, conv_node) if conv_node is not None else None
        if not isinstance(a, nn.Conv2d) or len(conv_node.users) != 1:
            continue
        with torch.no_grad():
            a.weight.mul_(k)
            if a.bias is not None:
                a.bias.mul_(k)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def _through_act(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The one user of conv `node`, past one homogeneous op (None: more than one user on the way)."""
    if len(node.users) != 1:
        return None
    nxt = next(iter(node.users))
    if _is_homogeneous(gm, nxt):
        return next(iter(nxt.users)) if len(nxt.users) == 1 else None
    return nxt


def _concat_slot(gm: torch.fx.GraphModule, cat: torch.fx.Node, src: torch.fx.Node
                 ) -> tuple[torch.fx.Node, int, int] | None:  # fmt: skip
    """(B, channel offset, width) when `cat` joins conv branches (each past at most a homogeneous op) along
    channels and feeds only B: where the branch ending in `src` starts among the `width` channels B reads."""
    if cat.op != "call_function" or cat.target is not torch.cat or len(cat.users) != 1 or not cat.args:
        return None
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    offset, found = 0, None
    for part in cat.args[0]:
        conv = part.args[0] if isinstance(part, torch.fx.Node) and _is_homogeneous(gm, part) and part.args else part
        a = _weighted(gm, conv) if isinstance(conv, torch.fx.Node) else None
        if dim != 1 or not isinstance(a, nn.Conv2d):
            return None
        found = offset if part is src else found
        offset += a.out_channels
    return None if found is None else (next(iter(cat.users)), found, offset)


def find_pairs(gm: torch.fx.GraphModule) -> list[tuple[str, str, int]]:
    """(A, B, offset) where conv A's output reaches conv/linear B alone, through a homogeneous op and maybe a
    channel concat of conv branches; A fills B's input channels from `offset`."""
    pairs = []
    for node in gm.graph.nodes:
        a = _weighted(gm, node)
        nxt = _through_act(gm, node) if isinstance(a, nn.Conv2d) else None
        if nxt is None:
            continue
        offset, width = 0, a.out_channels
        if nxt.op == "call_function" and nxt.target is torch.cat:
            act = next(iter(node.users))
            slot = _concat_slot(gm, nxt, node if act is nxt else act)
            if slot is None:
                continue
            nxt, offset, width = slot
        b = _weighted(gm, nxt)
        if b is not None and b.weight.shape[1] * getattr(b, "groups", 1) == width:
            pairs.append((str(node.target), str(nxt.target), offset))
    return pairs


def _b_view(b: nn.Module, channels: int, offset: int = 0) -> list[torch.Tensor]:
    """For each input channel c of B (from `offset`), a view of the weights that read it."""
    w = b.weight.data
    groups = getattr(b, "groups", 1)
    in_per, out_per = w.shape[1], w.shape[0] // groups
    return [w[(c // in_per) * out_per : (c // in_per + 1) * out_per, c % in_per]
            for c in range(offset, offset + channels)]  # fmt: skip


def _equalize_pair(a: nn.Conv2d, b: nn.Module, offset: int = 0) -> None:
    with torch.no_grad():
        r1 = a.weight.data.abs().flatten(1).amax(dim=1)
        views = _b_view(b, a.out_channels, offset)
        r2 = torch.stack([v.abs().max() for v in views])
        ok = (r1 > 0) & (r2 > 0)
        s = torch.where(ok, torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
        a.weight.data /= s.view(-1, *([1] * (a.weight.dim() - 1)))
        if a.bias is not None:
            a.bias.data /= s
        for c, v in enumerate(views):
            v.mul_(s[c])


def _range_ratio(gm: torch.fx.GraphModule, names: list[str]) -> float:
    worst = 1.0
    for n in names:
        r = gm.get_submodule(n).weight.data.abs().flatten(1).amax(dim=1)
        r = r[r > 0]
        if len(r):
            worst = max(worst, float(r.max() / r.min()))
    return worst


def bias_correct(model: nn.Module, images: torch.Tensor) -> int:
    """Subtract from every Conv2d/Linear bias the mean output shift its int8-rounded weights cause on
    `images` (float inputs). Returns the number of layers corrected (a bias is added where there was none)."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    inputs: dict[nn.Module, torch.Tensor] = {}
    run_hooked(model, images, [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0].detach()))
                               for m in mods])  # fmt: skip
    with torch.no_grad():
        for m in mods:
            x = inputs.get(m)
            if x is None:
                continue
            dw = fake_quant_weight(m.weight.data, 0) - m.weight.data
            if isinstance(m, nn.Conv2d):
                shift = m._conv_forward(x, dw, None).mean(dim=(0, 2, 3))
            else:
                shift = nn.functional.linear(x, dw).reshape(-1, m.out_features).mean(dim=0)
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
            m.bias.data -= shift
    return len(inputs)


def equalize(model: nn.Module, calib: torch.Tensor, *, correct_bias: bool = True) -> tuple[nn.Module, EqualizeRecord]:
    """A BN-folded, equalized (and bias-corrected) copy of `model` computing the same function in float."""
    gm = _fold(model)
    scales = fold_scales(gm)
    pairs = find_pairs(gm)
    a_names = [a for a, _, _ in pairs]
    before = _range_ratio(gm, a_names)
    for _ in range(SWEEPS):
        for a, b, offset in pairs:
            _equalize_pair(gm.get_submodule(a), gm.get_submodule(b), offset)
    after = _range_ratio(gm, a_names)
    corrected = bias_correct(gm, calib) if correct_bias else 0
    log.info("equalized %d layer pairs (worst range ratio %.3g -> %.3g; %d constant scales folded), bias-corrected "
             "%d layers", len(pairs), before, after, scales, corrected)  # fmt: skip
    return gm, EqualizeRecord(tuple((a, b) for a, b, _ in pairs), corrected, before, after, scales)
