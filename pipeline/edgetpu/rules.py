"""The Edge TPU's published model requirements and supported-operation table, as checks on one operator.

Source: Coral, "TensorFlow models on the Edge TPU", https://coral.ai/docs/edgetpu/models-intro/
(sections "Model requirements" and "Supported operations"). Requirements encoded here:

1. Tensor parameters are quantized to 8-bit fixed point (int8/uint8); bias tensors may be int32.
2. Tensor sizes are constant at compile time (no dynamic dimensions).
3. Model parameters (weights, bias) are constant at compile time.
4. Tensors are 1-, 2- or 3-dimensional; with more than 3 dimensions only the 3 innermost may be larger than 1.
5. Only operations of the supported table are used. The compiler maps ops in execution order until the first
   op it cannot map; that op and every op after it run on the CPU (it partitions the graph only once).

Known limitations from the table that can be checked on the flatbuffer are checked ("error": the op will not
map); those that depend on the compiler's internal choices ("may not be mapped ... to avoid loss in precision")
are reported as warnings. `min_runtime` is the table's "runtime version required" (0 = all versions).

Beyond the table, `edgetpu_compiler` 16.0.384591198 (the last release) refuses a whole model ("Didn't find op
for builtin opcode ... Model could not be parsed") when an op version is newer than its TFLite copy knows. The
versions seen refused in real reports are in `COMPILER16_REFUSED_VERSIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.edgetpu.tflite_model import OperatorInfo, SubgraphInfo, TensorInfo

DOC_URL = "https://coral.ai/docs/edgetpu/models-intro/"
SUPPORTED_OPS_URL = DOC_URL + "#supported-operations"
DEFAULT_RUNTIME = 14  # the newest runtime version in Coral's table
EIGHT_BIT = ("int8", "uint8")
CONST_INT = ("int32", "int64")  # bias, shapes, axes, paddings: compile-time parameters


@dataclass(frozen=True)
class OpRule:
    """One row of Coral's supported-operation table."""

    op: str  # TFLite builtin name
    doc_name: str  # name as written in the table
    min_runtime: int  # "runtime version required"; 0 = all
    limits: str  # known limitations, paraphrased


@dataclass(frozen=True)
class Issue:
    """Why an op may not map. severity 'error': it will not; 'warning': it may not (compiler's choice)."""

    rule: str  # supported-op | runtime | int8 | static-shape | rank | limitation | op-version
    severity: str
    message: str
    hint: str


def _r(op: str, doc: str, runtime: int = 0, limits: str = "") -> tuple[str, OpRule]:
    return op, OpRule(op, doc, runtime, limits)


# Coral's supported-operation table (https://coral.ai/docs/edgetpu/models-intro/#supported-operations).
# Where the table has one row per runtime range, the runtime >= 13 row is kept (runtime 14 is current).
SUPPORTED_OPS: dict[str, OpRule] = dict(
    [
        _r("ADD", "Add"),
        _r("AVERAGE_POOL_2D", "AveragePool2d", limits="No fused activation function."),
        _r(
            "CONCATENATION",
            "Concatenation",
            limits="No fused activation function. If any input is a compile-time constant, there must be exactly "
            "2 inputs and the constant must be all zeros (effectively zero padding).",
        ),
        _r("CONV_2D", "Conv2d", limits="Same dilation in x and y."),
        _r("DEPTHWISE_CONV_2D", "DepthwiseConv2d", limits="Same dilation in x and y (runtime <= 12: no dilation)."),
        _r("EXPAND_DIMS", "ExpandDims", 13),
        _r(
            "FULLY_CONNECTED",
            "FullyConnected",
            limits="Only the default weights format. Output tensor is one-dimensional.",
        ),
        _r("L2_NORMALIZATION", "L2Normalization"),
        _r("LOGISTIC", "Logistic"),
        _r("UNIDIRECTIONAL_SEQUENCE_LSTM", "LSTM", 14, "Unidirectional LSTM only."),
        _r("MAXIMUM", "Maximum"),
        _r("MAX_POOL_2D", "MaxPool2d", limits="No fused activation function."),
        _r(
            "MEAN",
            "Mean",
            limits="No reduction over the batch dimension (runtime <= 12: x and/or y dimensions only).",
        ),
        _r("MINIMUM", "Minimum"),
        _r("MUL", "Mul"),
        _r("PACK", "Pack", 13, "No packing in the batch dimension."),
        _r("PAD", "Pad", limits="No padding in the batch dimension (runtime <= 12: x and/or y only)."),
        _r("PRELU", "PReLU", 13, "Alpha must be 1-dimensional (only its innermost dimension may be > 1)."),
        _r("QUANTIZE", "Quantize", 13),
        _r("REDUCE_MAX", "ReduceMax", 14, "Cannot operate on the batch dimension."),
        _r("REDUCE_MIN", "ReduceMin", 14, "Cannot operate on the batch dimension."),
        _r("RELU", "ReLU"),
        _r("RELU6", "ReLU6"),
        _r("RELU_N1_TO_1", "ReLUN1To1"),
        _r("RESHAPE", "Reshape", limits="Certain reshapes might not be mapped for large tensor sizes."),
        _r(
            "RESIZE_BILINEAR",
            "ResizeBilinear",
            limits="Input/output is a 3-D tensor; depending on sizes it may not be mapped, to avoid precision loss.",
        ),
        _r(
            "RESIZE_NEAREST_NEIGHBOR",
            "ResizeNearestNeighbor",
            limits="Input/output is a 3-D tensor; depending on sizes it may not be mapped, to avoid precision loss.",
        ),
        _r("RSQRT", "Rsqrt", 14),
        _r("SLICE", "Slice"),
        _r("SOFTMAX", "Softmax", limits="Only a 1-D input tensor with at most 16,000 elements."),
        _r("SPACE_TO_DEPTH", "SpaceToDepth"),
        _r("SPLIT", "Split", limits="No splitting in the batch dimension."),
        _r("SQUARED_DIFFERENCE", "SquaredDifference", 14),
        _r("SQUEEZE", "Squeeze", limits="Runtime <= 12: only when no relayout is needed (leading 1s)."),
        _r(
            "STRIDED_SLICE",
            "StridedSlice",
            limits="All strides equal to 1 (effectively a slice), ellipsis mask 0, new-axis mask 0.",
        ),
        _r("SUB", "Sub"),
        _r("SUM", "Sum", 13, "Cannot operate on the batch dimension."),
        _r("TANH", "Tanh"),
        _r("TRANSPOSE", "Transpose", 14),
        _r("TRANSPOSE_CONV", "TransposeConv", 13),
    ]
)

# Op versions that edgetpu_compiler 16.0.384591198 was seen to refuse ("Didn't find op for builtin opcode
# '<OP>' version '<N>'" -> "Model could not be parsed"); from google-coral/edgetpu#631 (CONV_2D 6),
# #845 (TRANSPOSE_CONV 4), #879 (QUANTIZE 3) and google-coral/libedgetpu#71 (EXP 2).
COMPILER16_REFUSED_VERSIONS: dict[str, int] = {"CONV_2D": 6, "TRANSPOSE_CONV": 4, "QUANTIZE": 3, "EXP": 2}

# What to change in the PyTorch model (or the conversion) when an unsupported op shows up. LeakyReLU and
# Hardswish are confirmed unsupported by Coral (google-coral/edgetpu#597, #272).
OP_HINTS: dict[str, str] = {
    "LEAKY_RELU": "nn.LeakyReLU becomes LEAKY_RELU, which the Edge TPU lacks: use nn.ReLU or nn.ReLU6 (PReLU is "
    "listed for runtime >= 13) and fine-tune",
    "HARD_SWISH": "nn.Hardswish becomes HARD_SWISH, which the Edge TPU lacks: use nn.ReLU6 or nn.ReLU and fine-tune",
    "GELU": "nn.GELU is not supported: use nn.ReLU/nn.ReLU6 and fine-tune",
    "ELU": "nn.ELU is not supported: use nn.ReLU and fine-tune",
    "GATHER": "indexing/embedding lookups (torch.gather, x[idx], nn.Embedding) become GATHER: use slicing, a "
    "one-hot matmul (nn.Linear), or do the lookup on the host before/after the model",
    "GATHER_ND": "fancy indexing becomes GATHER_ND: use slicing or move the lookup to host post-processing",
    "ARG_MAX": "torch.argmax inside forward(): return the logits and take argmax on the host",
    "ARG_MIN": "torch.argmin inside forward(): return the values and take argmin on the host",
    "TOPK_V2": "torch.topk/sort inside forward(): return the scores and rank them on the host",
    "FLOOR": "torch.floor in the model: remove the rounding or do it on the host",
    "FLOOR_DIV": "integer division (//) in the model: use a constant MUL/RESHAPE or do it on the host",
    "FLOOR_MOD": "modulo (%) in the model: replace it with slicing/reshape or do it on the host",
    "DIV": "division between tensors: multiply by a constant reciprocal, or move it to post-processing",
    "EXP": "exp (softmax-like or attention math): keep SOFTMAX (1-D) or move it to post-processing",
    "LOG": "log in the model: move it to post-processing",
    "POW": "pow: use MUL (x*x) or move it to post-processing",
    "SQRT": "sqrt: use RSQRT (runtime >= 14) or move it to post-processing",
    "CAST": "a dtype cast (.float()/.int()/.bool()) inside forward(): remove it",
    "BATCH_MATMUL": "torch.matmul/bmm between activations (e.g. attention): use nn.Linear with constant weights",
    "CONV_3D": "nn.Conv3d: fold the depth axis into channels and use nn.Conv2d",
    "DEPTH_TO_SPACE": "nn.PixelShuffle: use nn.ConvTranspose2d or nn.Upsample(mode='nearest') + conv",
    "SPLIT_V": "torch.split with unequal sizes: use equal chunks (SPLIT) or slicing",
    "MIRROR_PAD": "reflect/replicate padding: use zero padding (padding_mode='zeros')",
    "TILE": "repeat/expand: use CONCATENATION or broadcasting in ADD/MUL",
    "DEQUANTIZE": "a float op inside the model needs dequantized input: find the float op after it and replace it",
    "CUSTOM": "a custom op: replace the layer with built-in ops",
}

_RULE_HINTS = {
    "static-shape": "export the ONNX with a fixed input size (no dynamic axes) and convert with a fixed batch "
    "(onnx2tf -b 1)",
    "rank": "keep activations 4-D with batch 1 (1, H, W, C) or smaller: fold extra leading dimensions into H or W "
    "with a reshape in PyTorch (5-D tensors from 3-D convs or per-head attention do not map)",
    "runtime": "install a newer Edge TPU runtime (libedgetpu) on the device, or avoid this op",
}


def hint_for(op: str, rule: str, *, float_model: bool = False) -> str:
    """What to change so that `op` maps, given the rule it breaks."""
    if rule == "supported-op":
        generic = f"{op} is not on the Edge TPU: replace that layer in PyTorch with supported ops ({SUPPORTED_OPS_URL})"
        return OP_HINTS.get(op, generic + " or move it to host post-processing")
    if rule == "int8" and float_model:
        return (
            "the model is not quantized: convert with precision int8 (full-integer, calibrated) and int8_io "
            "'int8' or 'uint8'"
        )
    if rule == "int8":
        return (
            f"{op} was left in float or int16: the int8 conversion did not quantize it (no int8 kernel or no "
            "calibration range); check onnx2tf's warnings for it, widen the calibration set, or replace the layer"
        )
    if rule == "op-version":
        return (
            "convert with a TensorFlow/onnx2tf version whose op versions compiler 16 knows, or avoid the construct "
            "that needs the newer op version (e.g. grouped convolutions need CONV_2D v6)"
        )
    return _RULE_HINTS.get(rule, OP_HINTS.get(op, "see " + SUPPORTED_OPS_URL))


# ------------------------------------------------------------------------------------------- generic checks


def check_dtypes(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    """Activations int8/uint8 with a scale; constants int8/uint8 weights or int32/int64 bias/shape parameters."""
    bad: list[str] = []
    for kind, idxs in (("input", op.inputs), ("output", op.outputs)):
        for pos, i in enumerate(idxs):
            t = sg.tensor(i)
            if t is None:
                continue
            if t.is_constant:
                if t.dtype not in EIGHT_BIT + CONST_INT:
                    bad.append(f"{kind} {pos} is a {t.dtype} constant")
            elif t.dtype not in EIGHT_BIT:
                bad.append(f"{kind} {pos} is {t.dtype}")
            elif t.quantization is None:
                bad.append(f"{kind} {pos} is {t.dtype} without quantization scale")
    if not bad:
        return []
    return [Issue("int8", "error", "not 8-bit quantized: " + "; ".join(bad), hint_for(op.name, "int8"))]


def check_static(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    dyn = [f"{t.name or t.index} {t.shape_signature}" for t in sg.op_inputs(op) + sg.op_outputs(op) if t.is_dynamic]
    if not dyn:
        return []
    return [Issue("static-shape", "error", "dynamic shape: " + ", ".join(dyn), hint_for(op.name, "static-shape"))]


def check_rank(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    """More than 3 dims: only the 3 innermost may be > 1 (activations; weights are laid out by the compiler)."""
    bad = [
        f"{t.name or t.index} {t.shape}"
        for t in sg.op_inputs(op) + sg.op_outputs(op)
        if not t.is_constant and t.rank > 3 and any(d > 1 for d in t.shape[:-3])
    ]
    if not bad:
        return []
    msg = "tensor with a dimension > 1 outside the 3 innermost: " + ", ".join(bad)
    return [Issue("rank", "error", msg, hint_for(op.name, "rank"))]


# ------------------------------------------------------------------------------------------ op limitations


def _limit(op: OperatorInfo, message: str, hint: str, *, severity: str = "error") -> list[Issue]:
    return [Issue("limitation", severity, message, hint)]


def _const_input(op: OperatorInfo, sg: SubgraphInfo, pos: int) -> TensorInfo | None:
    if pos >= len(op.inputs):
        return None
    t = sg.tensor(op.inputs[pos])
    return t if t is not None and t.is_constant else None


def _axes(op: OperatorInfo, sg: SubgraphInfo) -> tuple[list[int], int] | None:
    """(normalized reduction axes, input rank) from a constant axis input, None when unknown."""
    data, axes_t = sg.tensor(op.inputs[0]), _const_input(op, sg, 1)
    if data is None or axes_t is None or axes_t.values is None:
        return None
    r = max(data.rank, 1)
    return sorted({a % r for a in axes_t.values}), data.rank


def _fused_activation(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    if op.options.get("fused_activation_function", 0):
        return _limit(
            op,
            f"{op.name} has a fused activation function",
            "put the activation after the pooling/concat as its own layer (onnx2tf normally does)",
        )
    return []


def _concat(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    issues = _fused_activation(op, sg)
    consts = [t for t in sg.op_inputs(op) if t.is_constant]
    if consts and (len(op.inputs) != 2 or any(t.all_zero is not True for t in consts)):
        issues += _limit(
            op,
            "CONCATENATION with a constant input that is not a single all-zero pad",
            "concatenate only activations (a constant may only be an all-zero pad with exactly 2 inputs)",
        )
    return issues


def _dilation(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    dw, dh = op.options.get("dilation_w_factor", 1), op.options.get("dilation_h_factor", 1)
    if dw != dh:
        return _limit(op, f"{op.name} dilation differs in x and y ({dw} vs {dh})", "use the same dilation in x and y")
    return []


def _conv(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    issues = _dilation(op, sg)
    x, w = sg.tensor(op.inputs[0]), _const_input(op, sg, 1)
    if x is not None and w is not None and x.rank == 4 and w.rank == 4 and w.shape[3] != x.shape[3]:
        groups = x.shape[3] // max(w.shape[3], 1)
        issues += _limit(
            op,
            f"grouped convolution ({groups} groups: filter has {w.shape[3]} input channels, input has {x.shape[3]})",
            "nn.Conv2d(groups>1) becomes a grouped CONV_2D (op version 6) that the Edge TPU table does not cover "
            "and compiler 16 cannot parse: use groups=1, a depthwise conv (groups=in_channels), or split it into "
            "separate convs + torch.cat",
        )
    return issues


def _depthwise(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    issues = _dilation(op, sg)
    mult = op.options.get("depth_multiplier", 1)
    if mult not in (0, 1):
        issues += _limit(
            op,
            f"depthwise conv with depth multiplier {mult}",
            "the Coral table lists no depth-multiplier limit, but multipliers > 1 are rare on the Edge TPU; if the "
            "compiler refuses it, use groups=in_channels with out_channels=in_channels, then a 1x1 conv",
            severity="warning",
        )
    return issues


def _fully_connected(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    issues: list[Issue] = []
    if op.options.get("weights_format", 0) != 0:
        issues += _limit(
            op, "FULLY_CONNECTED weights are not in the default format", "convert without shuffled weights"
        )
    outs = sg.op_outputs(op)
    if outs and sum(1 for d in outs[0].shape if d > 1) > 1:
        issues += _limit(
            op,
            f"FULLY_CONNECTED output {outs[0].shape} is not one-dimensional",
            "apply nn.Linear to a flattened vector (batch 1), or use a 1x1 nn.Conv2d for per-position projections",
        )
    return issues


def _reduce(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    got = _axes(op, sg)
    if got is None:
        return []
    axes, rank = got
    issues: list[Issue] = []
    if rank == 4 and 0 in axes:
        issues += _limit(op, f"{op.name} reduces over the batch dimension (axes {axes})", "reduce over H/W/C only")
    if op.name == "MEAN" and rank >= 3 and (rank - 1) in axes:
        issues += _limit(
            op,
            f"MEAN over the channel dimension (axes {axes})",
            "runtime <= 12 reduces only x/y; prefer a spatial mean (global average pooling)",
            severity="warning",
        )
    return issues


def _pad(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    pads = _const_input(op, sg, 1)
    if pads is None or pads.values is None or len(pads.values) < 2:
        return []
    pairs = [pads.values[i : i + 2] for i in range(0, len(pads.values), 2)]
    issues: list[Issue] = []
    if len(pairs) == 4 and any(pairs[0]):
        issues += _limit(op, f"PAD pads the batch dimension {tuple(pairs[0])}", "pad only H, W (or C)")
    if len(pairs) >= 3 and any(pairs[-1]):
        issues += _limit(
            op,
            f"PAD pads the channel dimension {tuple(pairs[-1])}",
            "runtime <= 12 pads only x/y; pad channels with a 1x1 conv or concatenation of zeros instead",
            severity="warning",
        )
    return issues


def _softmax(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    x = sg.tensor(op.inputs[0])
    if x is None:
        return []
    issues: list[Issue] = []
    if sum(1 for d in x.shape if d > 1) > 1:
        issues += _limit(op, f"SOFTMAX input {x.shape} is not 1-D", "apply softmax to a flat vector, or on the host")
    if x.elements > 16000:
        issues += _limit(op, f"SOFTMAX over {x.elements} elements (max 16,000)", "do the softmax on the host")
    return issues


def _batch_axis(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    """SPLIT (axis is input 0) and PACK (axis option) must not work on the batch dimension of a 4-D tensor."""
    if op.name == "SPLIT":
        axis_t, data = _const_input(op, sg, 0), sg.tensor(op.inputs[1]) if len(op.inputs) > 1 else None
        axis = axis_t.values[0] if axis_t is not None and axis_t.values else None
    else:
        data = sg.tensor(op.inputs[0]) if op.inputs else None
        axis = op.options.get("axis")
    if axis is None or data is None:
        return []
    rank = data.rank + (1 if op.name == "PACK" else 0)
    if rank == 4 and axis % rank == 0:
        return _limit(op, f"{op.name} along the batch dimension", "split/stack along H, W or C")
    return []


def _strided_slice(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    issues: list[Issue] = []
    strides = _const_input(op, sg, 3)
    if strides is not None and strides.values is not None and any(s != 1 for s in strides.values):
        issues += _limit(
            op,
            f"STRIDED_SLICE with strides {strides.values} (only 1 is supported)",
            "slice with step 1 (x[:, ::2] becomes a strided slice): use a strided conv or pooling to subsample",
        )
    if op.options.get("ellipsis_mask", 0) or op.options.get("new_axis_mask", 0):
        issues += _limit(op, "STRIDED_SLICE with ellipsis or new-axis mask", "index without ... or None")
    return issues


def _resize(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    return _limit(
        op,
        f"{op.name}: the compiler may keep it on the CPU depending on the sizes (precision)",
        "prefer integer scale factors (e.g. 2x nearest) for upsampling",
        severity="warning",
    )


def _prelu(op: OperatorInfo, sg: SubgraphInfo) -> list[Issue]:
    alpha = _const_input(op, sg, 1)
    if alpha is not None and sum(1 for d in alpha.shape if d > 1) > 1:
        return _limit(op, f"PRELU alpha {alpha.shape} is not 1-D", "share alpha over H and W (one per channel)")
    return []


OP_CHECKS: dict[str, Callable[[OperatorInfo, SubgraphInfo], list[Issue]]] = {
    "AVERAGE_POOL_2D": _fused_activation,
    "MAX_POOL_2D": _fused_activation,
    "CONCATENATION": _concat,
    "CONV_2D": _conv,
    "DEPTHWISE_CONV_2D": _depthwise,
    "FULLY_CONNECTED": _fully_connected,
    "MEAN": _reduce,
    "SUM": _reduce,
    "REDUCE_MAX": _reduce,
    "REDUCE_MIN": _reduce,
    "PAD": _pad,
    "SOFTMAX": _softmax,
    "SPLIT": _batch_axis,
    "PACK": _batch_axis,
    "STRIDED_SLICE": _strided_slice,
    "RESIZE_BILINEAR": _resize,
    "RESIZE_NEAREST_NEIGHBOR": _resize,
    "PRELU": _prelu,
}


def check_operator(op: OperatorInfo, sg: SubgraphInfo, *, runtime: int = DEFAULT_RUNTIME) -> list[Issue]:
    """Every rule `op` breaks (an empty list: it can map to the Edge TPU)."""
    rule = SUPPORTED_OPS.get(op.name)
    if rule is None:
        what = f"custom op {op.name}" if op.custom else op.name
        return [
            Issue(
                "supported-op",
                "error",
                f"{what} is not in the Edge TPU's supported-op table",
                hint_for("CUSTOM" if op.custom else op.name, "supported-op"),
            )
        ]
    issues: list[Issue] = []
    if rule.min_runtime > runtime:
        issues.append(
            Issue(
                "runtime",
                "error",
                f"{op.name} needs Edge TPU runtime >= {rule.min_runtime} (target: {runtime})",
                hint_for(op.name, "runtime"),
            )
        )
    issues += check_dtypes(op, sg) + check_static(op, sg) + check_rank(op, sg)
    check = OP_CHECKS.get(op.name)
    if check is not None:
        issues += check(op, sg)
    return issues


def check_op_version(op_name: str, version: int) -> Issue | None:
    """A model-level blocker when compiler 16 is known to refuse this op version."""
    refused = COMPILER16_REFUSED_VERSIONS.get(op_name)
    if refused is None or version < refused:
        return None
    return Issue(
        "op-version",
        "error",
        f"{op_name} version {version}: edgetpu_compiler 16 refuses version >= {refused} "
        '("Didn\'t find op for builtin opcode"; the whole model fails to parse)',
        hint_for(op_name, "op-version"),
    )
