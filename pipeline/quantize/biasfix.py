"""Empirical bias correction of an int8 TFLite file: the mean error each quantized op carries, per output
channel, measured against the float file on calibration images and taken out of that op's int32 bias.

Quantization error is not zero-mean per channel: rounded weights shift a channel's output, clipped ranges
bias it, and a depthwise channel (few weights) has no other weights to average its rounding over. For every
CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED op with an int32 bias, in graph order (each one measured with
the ops before it already corrected, since a correction changes what the later ops receive):

    shift[c] = mean over images and positions of (float output - dequantized int8 output)[..., c]
    bias[c] += round(shift[c] / bias_scale[c])

counting only the positions where neither value sits at the edge of the op's int8 range: a fused ReLU/ReLU6
clamps there, so the error at a clamped position says nothing about the bias. Both files must come from the
same SavedModel (op output tensors share their names, as in operrors.py). Correcting every op at once from
one measurement was tried and diverges (MobileNetV2-style bench model: 0.972 agreement to 0.816 after one
pass, 0.10 after two): each op then also undoes the shift it inherits, which the ops before it remove too.

The file is edited in place in a copy of its bytes (the flatbuffer's bias buffers are rewritten, nothing
else changes: same ops, same scales, still full-integer, so it suits Edge TPU targets too). Reads TFLite's
flatbuffer schema from ai_edge_litert; no TensorFlow. Same idea as the empirical bias correction of
Nagel et al. 2019 ("Data-Free Quantization", section 4.2) and OpenVINO NNCF's bias correction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import write_bytes_atomic
from pipeline.edgetpu.tflite_model import builtin_code
from pipeline.errors import VerificationError
from pipeline.quantize.operrors import _interpreter_from, _pairs, _set_input

FLOAT_BUDGET_BYTES = 1 << 30  # the float outputs held at once; a large model gets fewer images (MIN_IMAGES at least)
MIN_IMAGES = 8


@dataclass(frozen=True)
class BiasOp:
    op_index: int
    output: int  # its output tensor index
    bias: np.ndarray  # int32 view into the model's bytes: writing it edits the file
    bias_scale: np.ndarray  # per output channel


@dataclass(frozen=True)
class BiasRecord:
    ops_corrected: int
    images: int
    mean_shift_steps: float  # mean |correction| in units of each op's output quantization step
    max_shift_steps: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "bias_corrected_ops": self.ops_corrected,
            "bias_images": self.images,
            "mean_shift_steps": round(self.mean_shift_steps, 4),
            "max_shift_steps": round(self.max_shift_steps, 4),
            "seconds": round(self.seconds, 1),
        }


def biased_ops(buf: bytearray) -> list[BiasOp]:
    """The ops of the main subgraph whose int32 bias can be corrected, in graph order."""
    import ai_edge_litert.schema_py_generated as schema

    kinds = {
        schema.BuiltinOperator.CONV_2D,
        schema.BuiltinOperator.DEPTHWISE_CONV_2D,
        schema.BuiltinOperator.FULLY_CONNECTED,
    }
    model = schema.Model.GetRootAs(buf, 0)
    graph = model.Subgraphs(0)
    found = []
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        if builtin_code(model.OperatorCodes(op.OpcodeIndex())) not in kinds:
            continue
        if op.InputsLength() < 3 or op.Inputs(2) < 0 or op.OutputsLength() < 1:
            continue
        tensor = graph.Tensors(op.Inputs(2))
        data = model.Buffers(tensor.Buffer()).DataAsNumpy()
        quant = tensor.Quantization()
        if tensor.Type() != schema.TensorType.INT32 or isinstance(data, int) or quant is None:
            continue  # a float bias, or one stored outside the flatbuffer (models over 2 GB)
        bias = data.view(np.int32)
        scale = np.asarray(quant.ScaleAsNumpy(), dtype=np.float64).reshape(-1)
        if scale.size not in (1, bias.size) or not np.all(scale > 0):
            continue
        found.append(BiasOp(k, int(op.Outputs(0)), bias, np.broadcast_to(scale, bias.shape).copy()))
    return found


def correct_biases(fp32: Path, int8: Path, images_nhwc: np.ndarray, out: Path) -> BiasRecord:
    """Write `int8` with every biased op's mean per-channel error on `images_nhwc` (normalized float NHWC,
    calibration images, never validation ones) taken out of its bias, to `out` (written atomically). Uses as many
    of the images as FLOAT_BUDGET_BYTES of float outputs allow (`BiasRecord.images` says how many)."""
    if len(images_nhwc) == 0:
        raise VerificationError(f"{int8}: no images to measure the bias shifts on")
    t0 = time.monotonic()
    buf = bytearray(Path(int8).read_bytes())
    fq, qi = _interpreter_from(Path(fp32).read_bytes(), str(fp32)), _interpreter_from(bytes(buf), str(int8))
    _, twin = _pairs(fq, qi)  # int8 tensor -> its float twin
    names = {d["index"]: d for d in qi.get_tensor_details()}
    ops = [o for o in biased_ops(buf) if o.output in twin and names[o.output]["dtype"] in (np.int8, np.uint8)]
    per_image = sum(4 * int(np.prod(names[o.output]["shape"])) for o in ops)
    keep = max(MIN_IMAGES, FLOAT_BUDGET_BYTES // max(per_image, 1))
    images_nhwc = images_nhwc[:keep]  # the float outputs of every op are held for every image
    floats = _float_outputs(fq, images_nhwc, [twin[o.output] for o in ops])
    shifts: list[float] = []
    for o in ops:
        detail = names[o.output]
        shift = _mean_error(qi, images_nhwc, o.output, detail, floats[twin[o.output]])
        o.bias[:] = np.clip(np.round(o.bias + shift / o.bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
        qi = _interpreter_from(bytes(buf), str(int8))  # the ops after it see this correction
        scale = float(detail["quantization"][0]) or 1.0
        shifts.extend(np.abs(shift) / scale)
    write_bytes_atomic(out, bytes(buf))
    return BiasRecord(
        ops_corrected=len(ops),
        images=len(images_nhwc),
        mean_shift_steps=float(np.mean(shifts)) if shifts else 0.0,
        max_shift_steps=float(np.max(shifts)) if shifts else 0.0,
        seconds=time.monotonic() - t0,
    )


def _float_outputs(fq: Any, images: np.ndarray, tensors: Sequence[int]) -> dict[int, np.ndarray]:
    """The float file's values of `tensors` on every image, flattened to (positions, channels)."""
    runs: dict[int, list[np.ndarray]] = {t: [] for t in tensors}
    for i in range(len(images)):
        _set_input(fq, images[i : i + 1].astype(np.float32))
        fq.invoke()
        for t in tensors:
            v = fq.get_tensor(t)
            runs[t].append(v.reshape(-1, v.shape[-1]).astype(np.float32))
    return {t: np.stack(v) for t, v in runs.items()}


def _mean_error(qi: Any, images: np.ndarray, out: int, detail: dict, floats: np.ndarray) -> np.ndarray:
    """Per channel: mean (float - dequantized int8) over the positions where neither is clamped."""
    scale, zp = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    lo, hi = (info.min - zp) * scale, (info.max - zp) * scale
    total = np.zeros(floats.shape[-1])
    count = np.zeros(floats.shape[-1])
    for i in range(len(images)):
        _set_input(qi, images[i : i + 1].astype(np.float32))
        qi.invoke()
        q = qi.get_tensor(out)
        q = q.reshape(-1, q.shape[-1])
        f = floats[i].astype(np.float64)
        live = (q > info.min) & (q < info.max) & (f > lo) & (f < hi)
        total += np.where(live, f - (q.astype(np.float64) - zp) * scale, 0.0).sum(axis=0)
        count += live.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)
