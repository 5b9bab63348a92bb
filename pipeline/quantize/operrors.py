"""Per-op quantization error: the float and the int8 TFLite file run side by side on the same images.

Both files come from one onnx2tf SavedModel, so an int8 op's output tensor has the same name as the float
op's (``model/tf.nn.relu_1/Relu;...``). Both interpreters run without delegates and with every intermediate
tensor kept (`experimental_preserve_all_tensors`), one image at a time; per op output tensor:

- `error_steps`: RMS error of the dequantized int8 tensor, in units of its quantization step (scale). Pure
  rounding of a correct tensor gives about 0.29; much more means error carried in from earlier ops or clipped
  outliers.
- `cosine`: cosine similarity of the int8 and float tensors (1.0 = same direction).
- `rel_error`: RMS error / RMS value, averaged over the tensor's channels (last NHWC axis). A channel whose
  values are flushed to zero by a scale set by a much wider neighbour scores 1.0, which a whole-tensor figure
  hides.
- `levels`: how many int8 steps the op's float values span on the images, (max - min) / scale. About 255
  for a tensor quantized over its own min/max; a few where the range is far wider than the values: measured
  here where TFLite's calibrator recorded an in-place op's output range for its input (pipeline/quantize/
  ranges.py), which the calibration remedy's "measured" ranges repair.
- `added`: how much of that relative error the op adds over the worst of its inputs (0 when it adds none);
  `share` is its share of the sum of `added` over all ops: an *estimate* of the op's share of the output
  error (errors do not add up exactly), used to rank the ops.

Every op is linked to its PyTorch layer by pipeline/edgetpu/attribution.py (weight shapes, then module types,
then "just after" the nearest weighted op).

Built by hand rather than on `tf.lite.experimental.QuantizationDebugger`: the debugger needs the converter and
TensorFlow in this process, and its per-layer figures feed each op the *quantized* inputs, so they cannot show
the error an op inherits. Its denylisting step is what pipeline/quantize/tfconv.py uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import VerificationError

SKIP_OPS = ("QUANTIZE", "DEQUANTIZE", "DELEGATE")
# ops that only move values: keeping an op float is useless when one of these requantizes its output
PASSTHROUGH = ("PAD", "RESHAPE", "SQUEEZE", "TRANSPOSE", "EXPAND_DIMS", "STRIDED_SLICE")
_CONST = ("Const", "arith.constant", "tfl.pseudo", "tfl.")
FEW_LEVELS = 32  # an op whose values span fewer int8 steps than this is named with the count (`where`)


def norm_name(name: str) -> str:
    """A tensor name without the constants fused into it (`...;Const_8`): those are numbered per conversion,
    so the float and the int8 file (and the calibrated model tfconv.py re-quantizes) differ only there."""
    parts = [p for p in name.split(";") if not p.startswith(_CONST)]
    return ";".join(parts) or name


@dataclass(frozen=True)
class OpError:
    op_index: int
    op: str  # TFLite builtin name, e.g. CONV_2D
    tensor: str  # its output tensor (the name the float model shares; what selective quantization denylists)
    layer: str | None  # the PyTorch module behind it, e.g. "features.3"
    layer_type: str | None
    how: str  # how the layer was found (attribution.LayerRef.how)
    scale: float
    error_steps: float
    cosine: float
    rel_error: float
    added: float
    share: float
    passthrough: tuple[str, ...] = ()  # output tensors of the PAD/RESHAPE/... ops right after it
    levels: float = float("nan")  # int8 steps the float values span: (max - min) / scale

    def where(self) -> str:
        few = f", its values span {self.levels:.0f} of 256 int8 levels" if self.levels < FEW_LEVELS else ""
        if self.layer is None:
            return f"op {self.op_index} {self.op}" + (f" ({few[2:]})" if few else "")
        near = "after " if self.how.startswith("after") else ""
        return f"op {self.op_index} {self.op} ({near}PyTorch `{self.layer}`{few})"


@dataclass(frozen=True)
class OpErrorReport:
    images: int
    source: str
    ops: tuple[OpError, ...]  # in op order
    output_rel_error: float  # rel_error of the logits

    def worst(self, n: int = 10) -> list[OpError]:
        return sorted(self.ops, key=lambda o: (-o.share, -o.rel_error))[:n]

    def to_dict(self, top: int = 15) -> dict[str, Any]:
        return {
            "images": self.images,
            "source": self.source,
            "output_rel_error": self.output_rel_error,
            "worst": [asdict(o) for o in self.worst(top)],
            "ops": len(self.ops),
        }


class _Acc:
    """Running sums for one tensor pair."""

    def __init__(self) -> None:
        self.n = 0
        self.e2 = self.f2 = self.q2 = self.dot = 0.0
        self.e2_c: np.ndarray | None = None
        self.f2_c: np.ndarray | None = None
        self.lo, self.hi = np.inf, -np.inf  # the float values' extremes

    def add(self, f: np.ndarray, q: np.ndarray) -> None:
        f, q = f.astype(np.float64), q.astype(np.float64)
        e = q - f
        self.n += f.size
        self.e2 += float(np.sum(e * e))
        self.f2 += float(np.sum(f * f))
        self.q2 += float(np.sum(q * q))
        self.dot += float(np.sum(f * q))
        if f.size:
            self.lo, self.hi = min(self.lo, float(f.min())), max(self.hi, float(f.max()))
        c = f.shape[-1] if f.ndim >= 2 else 1
        e2c = np.sum((e * e).reshape(-1, c), axis=0)
        f2c = np.sum((f * f).reshape(-1, c), axis=0)
        self.e2_c = e2c if self.e2_c is None else self.e2_c + e2c
        self.f2_c = f2c if self.f2_c is None else self.f2_c + f2c

    def rel_error(self) -> float:
        assert self.e2_c is not None and self.f2_c is not None
        live = self.f2_c > 1e-12 * max(1e-30, float(self.f2_c.max()))
        if not live.any():
            return 0.0
        return float(np.mean(np.sqrt(self.e2_c[live] / self.f2_c[live])))

    def cosine(self) -> float:
        den = np.sqrt(self.f2 * self.q2)
        return 1.0 if den == 0 else float(self.dot / den)


def _interpreter(path: Path) -> Any:
    if not Path(path).is_file():
        raise VerificationError(f"{path}: TFLite model not found")
    return _interpreter_from(Path(path).read_bytes(), str(path))


def _interpreter_from(content: bytes, label: str) -> Any:
    """A TFLite interpreter on `content` with every intermediate tensor kept, no delegates."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    try:
        interp = Interpreter(
            model_content=content,
            experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise VerificationError(f"{label}: not a loadable TFLite model: {exc}") from exc
    return interp


def _dequant(interp: Any, index: int, detail: Mapping[str, Any]) -> np.ndarray:
    t = interp.get_tensor(index)
    scale, zp = detail["quantization"]
    if t.dtype in (np.int8, np.uint8, np.int16) and scale:
        return (t.astype(np.float32) - zp) * scale
    return t.astype(np.float32)


def _set_input(interp: Any, x: np.ndarray) -> None:
    d = interp.get_input_details()[0]
    scale, zp = d["quantization"]
    if d["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        info = np.iinfo(d["dtype"])
        x = np.clip(np.round(x / scale + zp), info.min, info.max)
    interp.set_tensor(d["index"], x.astype(d["dtype"]))


def _pairs(fq: Any, qi: Any) -> tuple[list[tuple[dict, int, int]], dict[int, int]]:
    """(int8 op, its output tensor index, the float tensor index) for every op with a float twin, and the
    int8 tensor index -> float tensor index map (graph input included)."""
    by_name = {norm_name(d["name"]): d["index"] for d in fq.get_tensor_details()}
    q_details = {d["index"]: d for d in qi.get_tensor_details()}
    twin = {i: by_name[norm_name(d["name"])] for i, d in q_details.items() if norm_name(d["name"]) in by_name}
    pairs = []
    for op in qi._get_ops_details():
        if op["op_name"] in SKIP_OPS or not len(op["outputs"]):
            continue
        out = int(op["outputs"][0])
        if out in twin:
            pairs.append((op, out, twin[out]))
    return pairs, twin


def op_errors(
    fp32: Path, int8: Path, images_nhwc: np.ndarray, *, model: Any = None, example: Any = None, source: str = ""
) -> OpErrorReport:
    """Compare every op output of `int8` with `fp32` on normalized float NHWC images; link ops to `model`'s
    layers when a PyTorch model (and an example input) is given."""
    if len(images_nhwc) == 0:
        raise VerificationError(f"{int8}: no images to measure the per-op error on")
    fq, qi = _interpreter(Path(fp32)), _interpreter(Path(int8))
    pairs, _ = _pairs(fq, qi)
    q_details = {d["index"]: d for d in qi.get_tensor_details()}
    accs = {out: _Acc() for _, out, _ in pairs}
    for i in range(len(images_nhwc)):
        x = images_nhwc[i : i + 1].astype(np.float32)
        _set_input(fq, x)
        _set_input(qi, x)
        fq.invoke()
        qi.invoke()
        for _, out, ftwin in pairs:
            f = fq.get_tensor(ftwin).astype(np.float32)
            q = _dequant(qi, out, q_details[out])
            if f.shape == q.shape:
                accs[out].add(f, q)
    refs = {}
    if model is not None and example is not None:
        from pipeline.edgetpu.attribution import attribute_ops

        refs = {r.op_index: r for r in attribute_ops(Path(int8), model, example)}
    return _report(pairs, accs, q_details, refs, qi, len(images_nhwc), source)


def _passthrough(qi: Any, q_details: Mapping[int, Any]) -> dict[int, tuple[str, ...]]:
    """tensor -> the output names of the chain of PASSTHROUGH ops that consume it."""
    ops = [o for o in qi._get_ops_details() if o["op_name"] != "DELEGATE"]
    consumers: dict[int, list[dict]] = {}
    for o in ops:
        for t in o["inputs"]:
            consumers.setdefault(int(t), []).append(o)
    out: dict[int, tuple[str, ...]] = {}
    for t in list(consumers):
        chain, cur = [], t
        while True:
            nxt = [o for o in consumers.get(cur, []) if o["op_name"] in PASSTHROUGH and len(o["outputs"])]
            if len(nxt) != 1:
                break
            cur = int(nxt[0]["outputs"][0])
            chain.append(q_details[cur]["name"])
        if chain:
            out[t] = tuple(chain)
    return out


def _report(
    pairs: Sequence,
    accs: Mapping[int, _Acc],
    q_details: Mapping[int, Any],
    refs: Mapping[int, Any],
    qi: Any,
    n: int,
    source: str,
) -> OpErrorReport:
    rel = {out: a.rel_error() for out, a in accs.items() if a.n}
    in_idx = int(qi.get_input_details()[0]["index"])
    rel.setdefault(in_idx, 0.0)
    rows = []
    after = _passthrough(qi, q_details)
    for op, out, _ in pairs:
        a = accs[out]
        if not a.n:
            continue
        inherited = max([rel.get(int(t), 0.0) for t in op["inputs"] if int(t) >= 0] + [0.0])
        scale = float(q_details[out]["quantization"][0])
        rmse = float(np.sqrt(a.e2 / a.n))
        ref = refs.get(int(op["index"]))
        rows.append(
            dict(
                op_index=int(op["index"]),
                op=op["op_name"],
                tensor=q_details[out]["name"],
                layer=getattr(ref, "layer", None),
                layer_type=getattr(ref, "layer_type", None),
                how=getattr(ref, "how", "unmatched"),
                scale=scale,
                error_steps=rmse / scale if scale else float("nan"),
                cosine=a.cosine(),
                rel_error=rel[out],
                added=max(0.0, rel[out] - inherited),
                passthrough=after.get(out, ()),
                levels=(a.hi - a.lo) / scale if scale else float("nan"),
            )
        )
    total = sum(r["added"] for r in rows) or 1.0
    ops = tuple(OpError(**r, share=r["added"] / total) for r in rows)
    out_idx = int(qi.get_output_details()[0]["index"])
    return OpErrorReport(n, source, ops, float(rel.get(out_idx, ops[-1].rel_error if ops else 0.0)))
