"""Range tuning of an int8 TFLite file: each activation tensor's int8 range narrowed or widened where that
brings the file's logits closer to the float file's on calibration images.

Every calibration method (min/max, trimmed pool, "mse", percentiles) picks a tensor's range from that
tensor's own values, one rule for all. What a range should be is a trade between clipping and rounding that
depends on what the ops after it do with the error, so here it is chosen end to end: in graph order, each
activation range is scaled by a factor from FACTORS (the zero point kept, so 0 stays exact and the
asymmetric range keeps its shape) and the factor that gives the lowest mean KL divergence of the file's
softmax from the float file's, on the calibration images, is kept (1.0 unless another beats it by
MIN_GAIN). Every trial is the real int8 file, run by the TFLite interpreter as CPU targets run it (XNNPACK, which the
agreement is then measured with too; 7x faster than the reference kernels here).

The file's quantization parameters are edited in a copy of its bytes (flatbuffer scale vectors and int32
bias buffers; the schema from ai_edge_litert, no TensorFlow). TFLite's int8 kernels derive their requantize
multipliers from the tensors' scales when the interpreter is built, so a conv/FC/ADD/MUL/MEAN output can take
any scale; a conv, depthwise conv or fully-connected op reading the tensor gets its bias scale (which must be
input scale x weight scale) and its int32 bias values rescaled with it. Ops whose int8 kernels need their
inputs and output on one scale (reshape, pad, pooling, concatenation, ...) tie those tensors into one group,
scaled together. A group touching the graph's input or output, a fixed-scale output (logistic, softmax), an
op not listed here, or a shared bias buffer is left as it is. Same ops, same weights, still full-integer: it
suits Edge TPU targets too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import write_bytes_atomic
from pipeline.edgetpu.tflite_model import builtin_code, enum_names
from pipeline.errors import VerificationError

FACTORS = (0.3, 0.5, 0.7, 0.8, 0.9, 1.15, 1.3)  # each range's scale x these, all tried
MIN_GAIN = 0.002  # a factor other than the current one must lower the mean KL by this share
MIN_IMAGES = 8

# int8 kernels that compute their output's requantization from its scale at prepare time
RESCALING = {
    "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "MEAN", "HARD_SWISH", "QUANTIZE",
    "LEAKY_RELU",
}  # fmt: skip
# int8 kernels reading an input of any scale (the ones with a bias are handled apart)
SCALE_AWARE = RESCALING | {"LOGISTIC", "SOFTMAX", "TANH", "DEQUANTIZE", "ARG_MAX"}
BIASED = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
# int8 kernels whose data inputs and outputs share one scale and zero point
TIED = {
    "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "PAD", "PADV2", "MAX_POOL_2D", "AVERAGE_POOL_2D", "TRANSPOSE",
    "CONCATENATION", "STRIDED_SLICE", "SLICE", "SPLIT", "SPLIT_V", "DEPTH_TO_SPACE", "SPACE_TO_DEPTH",
    "RESIZE_NEAREST_NEIGHBOR", "BATCH_TO_SPACE_ND", "SPACE_TO_BATCH_ND",
}  # fmt: skip


@dataclass
class _Group:
    tensors: list[int]
    names: list[str]
    scales: list[np.ndarray]  # each tensor's scale vector, a view into the model's bytes
    biases: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (int32 values, their scales)
    first_op: int = 0
    factor: float = 1.0
    _scales0: list[np.ndarray] = field(default_factory=list)  # the scales as the converter wrote them
    _biases0: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # and the biases

    def set_factor(self, f: float) -> None:
        """Every range of the group `f` times the converter's (the consumers' biases rescaled with it)."""
        if not self._scales0:
            self._scales0 = [s.copy() for s in self.scales]
            self._biases0 = [(v.copy(), sc.copy()) for v, sc in self.biases]
        for s, s0 in zip(self.scales, self._scales0, strict=True):
            s[:] = s0 * np.float32(f)
        for (values, scale), (v0, sc0) in zip(self.biases, self._biases0, strict=True):
            values[:] = np.clip(np.round(v0 / f), -(2**31), 2**31 - 1).astype(np.int32)
            scale[:] = sc0 * np.float32(f)
        self.factor = f


@dataclass(frozen=True)
class RangeRecord:
    groups: int  # activation ranges (tied tensors counted once) that could be tuned
    changed: int
    kl_before: float
    kl_after: float
    images: int
    trials: int
    seconds: float
    factors: tuple[float, ...] = ()  # the factor kept for each changed group, graph order
    by_tensor: dict[str, float] = field(default_factory=dict)  # tensor name -> factor, changed groups only

    def to_dict(self) -> dict[str, Any]:
        return {
            "ranges_tunable": self.groups,
            "ranges_changed": self.changed,
            "kl_before": round(self.kl_before, 6),
            "kl_after": round(self.kl_after, 6),
            "tuning_images": self.images,
            "trials": self.trials,
            "seconds": round(self.seconds, 1),
            "factors": [round(f, 3) for f in self.factors],
        }


def tunable_groups(buf: bytearray) -> list[_Group]:
    """The activation ranges of the main subgraph that can be rescaled, with the views that do it."""
    import ai_edge_litert.schema_py_generated as schema

    names = enum_names(schema.BuiltinOperator)
    model = schema.Model.GetRootAs(buf, 0)
    graph = model.Subgraphs(0)
    ops = []
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        kind = names.get(builtin_code(model.OperatorCodes(op.OpcodeIndex())), "?")
        ops.append((kind, [int(i) for i in op.InputsAsNumpy()], [int(i) for i in op.OutputsAsNumpy()]))
    boundary = {int(i) for i in graph.InputsAsNumpy()} | {int(i) for i in graph.OutputsAsNumpy()}

    def activation(t: int) -> bool:
        if t < 0:
            return False
        tensor = graph.Tensors(t)
        q = tensor.Quantization()
        if tensor.Type() != schema.TensorType.INT8 or q is None or q.ScaleLength() != 1:
            return False
        return isinstance(model.Buffers(tensor.Buffer()).DataAsNumpy(), int)  # no constant data

    parent = {t: t for t in range(graph.TensorsLength()) if activation(t)}

    def find(t: int) -> int:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for kind, ins, outs in ops:
        if kind in TIED:
            tied = [t for t in ins + outs if t in parent]
            for t in tied[1:]:
                parent[find(t)] = find(tied[0])
    members: dict[int, list[int]] = {}
    for t in parent:
        members.setdefault(find(t), []).append(t)
    bias_users: dict[int, int] = {}
    for kind, ins, _ in ops:
        if kind in BIASED and len(ins) > 2 and ins[2] >= 0:
            b = graph.Tensors(ins[2]).Buffer()
            bias_users[b] = bias_users.get(b, 0) + 1
    owners: dict[int, set[int]] = {}  # a scale vector's address -> the tensors reading it
    for t in range(graph.TensorsLength()):
        q = graph.Tensors(t).Quantization()
        if q is not None and q.ScaleLength():
            owners.setdefault(_address(q.ScaleAsNumpy()), set()).add(t)
    groups = []
    for tensors in members.values():
        g = _group(model, graph, ops, set(tensors), boundary, bias_users)
        if g is not None and not _shares_vectors(g, owners):
            groups.append(g)
    return sorted(groups, key=lambda g: g.first_op)


def _address(v: np.ndarray) -> int:
    return int(v.__array_interface__["data"][0])


def _shares_vectors(g: _Group, owners: dict[int, set[int]]) -> bool:
    """A scale vector the writer stored once for tensors outside the group too (editing it would change them)."""
    mine = set(g.tensors)
    if any(owners.get(_address(s), set()) - mine for s in g.scales):
        return True
    return any(len(owners.get(_address(scale), ())) > 1 for _, scale in g.biases)


def _group(model: Any, graph: Any, ops: list, tensors: set[int], boundary: set[int], bias_users: dict) -> Any:
    import ai_edge_litert.schema_py_generated as schema

    if tensors & boundary:
        return None
    quants = [graph.Tensors(t).Quantization() for t in tensors]
    ref = [(float(q.Scale(0)), int(q.ZeroPoint(0)) if q.ZeroPointLength() else 0) for q in quants]
    if len(set(ref)) != 1:
        return None  # tied tensors that do not share one range: not what the kernels assume
    order = sorted(tensors)
    names = [graph.Tensors(t).Name().decode(errors="replace") for t in order]
    g = _Group(order, names, [graph.Tensors(t).Quantization().ScaleAsNumpy() for t in order], first_op=len(ops))
    for k, (kind, ins, outs) in enumerate(ops):
        made = [t for t in outs if t in tensors]
        read = [i for i, t in enumerate(ins) if t in tensors]
        if made:
            g.first_op = min(g.first_op, k)
            if kind not in RESCALING and kind not in TIED:
                return None
        if not read or kind in TIED:
            continue
        if kind in BIASED:
            if read != [0]:
                return None
            if len(ins) > 2 and ins[2] >= 0:
                bias = graph.Tensors(ins[2])
                data = model.Buffers(bias.Buffer()).DataAsNumpy()
                if bias.Type() != schema.TensorType.INT32 or isinstance(data, int) or bias_users[bias.Buffer()] > 1:
                    return None
                g.biases.append((data.view(np.int32), bias.Quantization().ScaleAsNumpy()))
        elif kind not in SCALE_AWARE:
            return None
    return g


def tune_ranges(fp32: Path, int8: Path, images_nhwc: np.ndarray, out: Path) -> RangeRecord:
    """Write `int8` with its activation ranges tuned on `images_nhwc` (normalized float NHWC, calibration
    images, never validation ones) to `out` (written atomically)."""
    if len(images_nhwc) < MIN_IMAGES:
        raise VerificationError(f"{int8}: range tuning needs at least {MIN_IMAGES} images, got {len(images_nhwc)}")
    t0 = time.monotonic()
    buf = bytearray(Path(int8).read_bytes())
    target = _softmax(_logits(Path(fp32).read_bytes(), images_nhwc, str(fp32)))

    def kl() -> float:
        return _kl(target, _softmax(_logits(bytes(buf), images_nhwc, str(int8))))

    before = best = kl()  # first: a file that does not load gets its clear error before it is parsed
    groups = tunable_groups(buf)
    trials = 1
    for g in groups:
        best, n = _tune(g, best, kl)
        trials += n
    write_bytes_atomic(out, bytes(buf))
    changed = [g for g in groups if g.factor != 1.0]
    by_tensor = {n: g.factor for g in changed for n in g.names}
    return RangeRecord(len(groups), len(changed), before, best, len(images_nhwc), trials,
                       time.monotonic() - t0, tuple(g.factor for g in changed), by_tensor)  # fmt: skip


def apply_factors(int8: Path, by_tensor: Mapping[str, float], out: Path) -> int:
    """Write `int8` with the factors a tuning chose (RangeRecord.by_tensor) applied to the groups of the same
    tensor names, to `out`: the same ranges for a file quantized again from the same SavedModel (selective
    quantization keeps some ops float: their tensors are no longer int8 and are passed over). Returns how
    many groups changed."""
    buf = bytearray(Path(int8).read_bytes())
    changed = 0
    for g in tunable_groups(buf):
        factors = {by_tensor[n] for n in g.names if n in by_tensor}
        if len(factors) == 1:
            g.set_factor(factors.pop())
            changed += 1
    write_bytes_atomic(out, bytes(buf))
    return changed


def _tune(g: _Group, best: float, kl: Any) -> tuple[float, int]:
    """Every factor of FACTORS tried on the group (the KL is not monotone in the factor: the int8 grid and the
    requantize multipliers interact, measured); the group is left at the best one, 1.0 unless one beats the
    current KL by MIN_GAIN."""
    chosen, target = 1.0, best * (1 - MIN_GAIN)
    for f in FACTORS:
        g.set_factor(f)
        try:
            e = kl()
        except VerificationError:
            continue  # a kernel refused the new scale: not this factor
        if e < target:
            chosen, best, target = f, e, e
    g.set_factor(chosen)
    return best, len(FACTORS)


def _logits(content: bytes, images: np.ndarray, label: str) -> np.ndarray:
    """The file's dequantized output on every image, run as CPU targets run it (XNNPACK, 1 thread)."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.tflite import run_batch

    try:
        interp = Interpreter(model_content=content, num_threads=1)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise VerificationError(f"{label}: not a loadable TFLite model: {exc}") from exc
    interp._edgeship_path = label  # type: ignore[attr-defined]  # names the file in run_batch's errors
    return run_batch(interp, images).astype(np.float64)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
