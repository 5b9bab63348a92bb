"""Which PyTorch layer each op of a converted .tflite file came from.

onnx2tf names tensors after TensorFlow ops (``model/tf.nn.convolution_3/convolution``), not after the PyTorch
modules, so the link is rebuilt from structure:

- weighted ops (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, TRANSPOSE_CONV) are matched to the model's
  Conv/Linear modules by weight shape (TFLite OHWI / 1HWO / OI vs PyTorch OIHW / OI), in execution order;
- activation, pooling and similar ops are matched to the modules of the matching type (nn.LeakyReLU ->
  LEAKY_RELU) by their order of execution when the counts agree;
- anything else is placed relative to the nearest weighted op before it ("after features.3").

It is a best effort and says so: a layer it cannot place gets ``None``, never a guess presented as fact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.edgetpu.tflite_model import OperatorInfo, SubgraphInfo, read_tflite
from pipeline.models.hooks import run_hooked

WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")

# TFLite op -> the PyTorch module types that become it (one op per call).
BY_TYPE: dict[str, tuple[type[nn.Module], ...]] = {
    "LEAKY_RELU": (nn.LeakyReLU,),
    "HARD_SWISH": (nn.Hardswish,),
    "GELU": (nn.GELU,),
    "ELU": (nn.ELU,),
    "PRELU": (nn.PReLU,),
    "LOGISTIC": (nn.Sigmoid,),
    "TANH": (nn.Tanh,),
    "SOFTMAX": (nn.Softmax,),
    "MAX_POOL_2D": (nn.MaxPool2d,),
    "AVERAGE_POOL_2D": (nn.AvgPool2d,),
    "MEAN": (nn.AdaptiveAvgPool2d,),
    "RESIZE_NEAREST_NEIGHBOR": (nn.Upsample,),
    "RESIZE_BILINEAR": (nn.Upsample,),
    "DEPTH_TO_SPACE": (nn.PixelShuffle,),
}


@dataclass(frozen=True)
class LayerRef:
    """The PyTorch side of one TFLite op."""

    op_index: int
    layer: str | None  # dotted module name, e.g. "blocks.3.conv_dw"
    layer_type: str | None  # e.g. "Conv2d"
    how: str  # "weight shape" | "module type order" | "after <layer>" | "unmatched"

    def describe(self) -> str:
        if self.layer is None:
            return "no PyTorch layer found for it"
        if self.how.startswith("after"):
            return f"just after PyTorch layer `{self.layer}` ({self.layer_type})"
        return f"PyTorch layer `{self.layer}` ({self.layer_type})"


def _call_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Leaf modules in the order forward() calls them (a module called twice appears twice)."""
    calls: list[tuple[str, nn.Module]] = []
    hooks = [
        mod.register_forward_hook(lambda m, i, o, n=name: calls.append((n, m)))
        for name, mod in model.named_modules()
        if name and not list(mod.children())
    ]
    run_hooked(model, example, hooks)
    return calls


def _tflite_weight_shape(op: OperatorInfo, sg: SubgraphInfo) -> tuple[int, ...] | None:
    pos = 2 if op.name == "TRANSPOSE_CONV" else 1
    if len(op.inputs) <= pos or op.inputs[pos] < 0:
        return None
    return sg.tensors[op.inputs[pos]].shape


def _as_tflite_shape(op: str, mod: nn.Module) -> tuple[int, ...] | None:
    """The shape the module's weight has in a TFLite op of kind `op`, or None if it cannot become one."""
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    shape = tuple(w.shape)
    if op == "FULLY_CONNECTED" and isinstance(mod, nn.Linear):
        return shape
    if isinstance(mod, nn.Conv2d) and len(shape) == 4:
        o, i, kh, kw = shape
        if op == "DEPTHWISE_CONV_2D" and mod.groups == mod.in_channels and i == 1:
            return (1, kh, kw, o)
        if op == "CONV_2D":
            return (o, kh, kw, i)
    if isinstance(mod, nn.ConvTranspose2d) and op == "TRANSPOSE_CONV":
        i, o, kh, kw = shape
        return (o, kh, kw, i)
    return None


def attribute_ops(path: Path, model: nn.Module, example: torch.Tensor) -> list[LayerRef]:
    """One LayerRef per op of the main subgraph of the .tflite at `path`, in op order."""
    sg = read_tflite(Path(path)).main
    calls = _call_order(model, example)
    refs: dict[int, LayerRef] = {}

    used: set[int] = set()
    pointer = 0
    for op in sg.operators:
        if op.name not in WEIGHTED:
            continue
        shape = _tflite_weight_shape(op, sg)
        order = list(range(pointer, len(calls))) + list(range(pointer))
        for k in order:
            name, mod = calls[k]
            if k not in used and shape is not None and _as_tflite_shape(op.name, mod) == shape:
                used.add(k)
                pointer = k + 1
                refs[op.index] = LayerRef(op.index, name, type(mod).__name__, "weight shape")
                break

    for op_name, types in BY_TYPE.items():
        ops = [op for op in sg.operators if op.name == op_name]
        mods = [(n, m) for n, m in calls if isinstance(m, types)]
        if ops and len(ops) == len(mods):
            for op, (n, m) in zip(ops, mods, strict=True):
                refs.setdefault(op.index, LayerRef(op.index, n, type(m).__name__, "module type order"))

    out: list[LayerRef] = []
    last: LayerRef | None = None
    for op in sg.operators:
        ref = refs.get(op.index)
        if ref is not None and ref.how == "weight shape":
            last = ref
        if ref is None:
            ref = (
                LayerRef(op.index, last.layer, last.layer_type, f"after {last.layer}")
                if last is not None
                else LayerRef(op.index, None, None, "unmatched")
            )
        out.append(ref)
    return out


def matched_share(refs: Sequence[LayerRef]) -> float:
    """Share of weighted/typed ops placed exactly (not merely 'after' something): a quality figure for reports."""
    kinds = Counter("exact" if r.how in ("weight shape", "module type order") else "other" for r in refs)
    return kinds["exact"] / max(1, len(refs))
