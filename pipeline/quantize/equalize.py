"""Remedy (b): cross-layer equalization and bias correction, in PyTorch, before export.

1. BatchNorm folded into the convolution before it (`torch.fx.experimental.optimization.fuse`), so the
   weights equalized are the weights TFLite quantizes.
2. Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): for each pair conv A -> [ReLU /
   LeakyReLU / nothing] -> conv or linear B where A's output feeds only B, output channel c of A is divided by
   s_c = sqrt(r1_c / r2_c) and B's input channel c multiplied by it (r1_c = max |A weight of channel c|,
   r2_c = max |B weights reading channel c|). ReLU is positively homogeneous, so the float model computes the
   same function, while both layers' per-channel ranges become sqrt(r1_c r2_c): a depthwise channel with a
   1000x wider range no longer sets the scale of the whole activation tensor. Four sweeps over the pairs.
3. Bias correction: the expected output shift caused by rounding the weights to TFLite's per-channel int8
   grid, E[conv(x, W_q - W)] per output channel over the calibration images (float inputs), is subtracted
   from each Conv/Linear bias.

A model that torch.fx cannot trace (data-dependent control flow) cannot be equalized: `EqualizeSkipped`.
"""

from __future__ import annotations

import copy
import logging
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

    def to_dict(self) -> dict:
        return {
            "pairs": [list(p) for p in self.pairs],
            "bias_corrected": self.bias_corrected,
            "max_range_ratio_before": self.max_range_ratio_before,
            "max_range_ratio_after": self.max_range_ratio_after,
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


def find_pairs(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """(A, B) module names where conv A's output reaches conv/linear B alone, through a homogeneous op."""
    pairs = []
    for node in gm.graph.nodes:
        a = _weighted(gm, node)
        if not isinstance(a, nn.Conv2d) or len(node.users) != 1:
            continue
        nxt = next(iter(node.users))
        if _is_homogeneous(gm, nxt):
            if len(nxt.users) != 1:
                continue
            nxt = next(iter(nxt.users))
        b = _weighted(gm, nxt)
        if b is not None and b.weight.shape[1] * getattr(b, "groups", 1) == a.out_channels:
            pairs.append((str(node.target), str(nxt.target)))
    return pairs


def _b_view(b: nn.Module, channels: int) -> list[torch.Tensor]:
    """For each input channel c of B, a view of the weights that read it."""
    w = b.weight.data
    groups = getattr(b, "groups", 1)
    in_per, out_per = w.shape[1], w.shape[0] // groups
    return [w[(c // in_per) * out_per : (c // in_per + 1) * out_per, c % in_per] for c in range(channels)]


def _equalize_pair(a: nn.Conv2d, b: nn.Module) -> None:
    with torch.no_grad():
        r1 = a.weight.data.abs().flatten(1).amax(dim=1)
        views = _b_view(b, a.out_channels)
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
    pairs = find_pairs(gm)
    a_names = [a for a, _ in pairs]
    before = _range_ratio(gm, a_names)
    for _ in range(SWEEPS):
        for a, b in pairs:
            _equalize_pair(gm.get_submodule(a), gm.get_submodule(b))
    after = _range_ratio(gm, a_names)
    corrected = bias_correct(gm, calib) if correct_bias else 0
    log.info(
        "equalized %d layer pairs (worst range ratio %.3g -> %.3g), bias-corrected %d layers",
        len(pairs),
        before,
        after,
        corrected,
    )
    return gm, EqualizeRecord(tuple(pairs), corrected, before, after)
