"""Read a .tflite flatbuffer into plain frozen records: operators, tensors, quantization, constant buffers.

The reader uses the flatbuffers-generated TFLite schema module that ai-edge-litert ships
(`ai_edge_litert/schema_py_generated.py`; it needs only the `flatbuffers` package, not TensorFlow and not an
interpreter). When ai-edge-litert is missing it falls back to the copy inside TensorFlow
(`tensorflow/lite/python/schema_py_generated.py`), imported only then. Nothing is allocated or executed:
a model with ops the local runtime cannot run (e.g. an `edgetpu-custom-op`) reads fine.

Conventions:
- `OperatorInfo.name` is the builtin op name as in the schema (`CONV_2D`, `FULLY_CONNECTED`, ...) or, for a
  custom op, its custom code (`edgetpu-custom-op`); `version` is the op version stored in the model.
- `TensorInfo.shape_signature` is the shape with -1 for dynamic dimensions (equal to `shape` when the model
  stores no signature).
- A tensor is constant when its buffer holds data; `buffer_bytes` is that size. Small integer constants (shapes,
  axes, paddings, strides) keep their values in `values`, so rules can check them.
- Operators are listed in the subgraph's stored order, which is the order the interpreter executes them.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pipeline.errors import VerificationError

log = logging.getLogger(__name__)

_IDENTIFIER = b"TFL3"
_MAX_VALUES = 256  # integer constants up to this many elements keep their values
_INT_DTYPES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of one tensor: real = scale * (q - zero_point), per tensor or per channel."""

    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int

    @property
    def kind(self) -> str:
        """'per-channel' (one scale per slice of `quantized_dimension`) or 'per-tensor'."""
        return "per-channel" if len(self.scales) > 1 else "per-tensor"


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    dtype: str  # schema TensorType in lower case: float32, int8, uint8, int32, ...
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]  # -1 marks a dynamic dimension
    quantization: Quantization | None  # None when the tensor carries no scale
    buffer: int  # index into the model's buffers (0 = no data)
    buffer_bytes: int  # size of the constant data, 0 for activations
    values: tuple[int, ...] | None = None  # small integer constants only
    all_zero: bool | None = None  # constants only: every element is (real) zero
    is_variable: bool = False

    @property
    def is_constant(self) -> bool:
        return self.buffer_bytes > 0

    @property
    def is_dynamic(self) -> bool:
        return any(d < 0 for d in self.shape_signature)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class OperatorInfo:
    index: int  # position in the subgraph = execution order
    name: str  # builtin op name, or the custom code of a custom op
    version: int
    builtin_code: int  # -1 for custom ops
    custom: bool
    inputs: tuple[int, ...]  # tensor indices; -1 marks an omitted optional input
    outputs: tuple[int, ...]
    options_type: str  # e.g. "Conv2DOptions", "" when none
    options: dict[str, Any] = field(default_factory=dict, compare=False)  # builtin options, plain values


@dataclass(frozen=True)
class SubgraphInfo:
    index: int
    name: str
    tensors: tuple[TensorInfo, ...]
    operators: tuple[OperatorInfo, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def tensor(self, index: int) -> TensorInfo | None:
        return self.tensors[index] if 0 <= index < len(self.tensors) else None

    def op_inputs(self, op: OperatorInfo) -> list[TensorInfo]:
        """The op's present input tensors (optional inputs left out are skipped)."""
        return [t for i in op.inputs if (t := self.tensor(i)) is not None]

    def op_outputs(self, op: OperatorInfo) -> list[TensorInfo]:
        return [t for i in op.outputs if (t := self.tensor(i)) is not None]


@dataclass(frozen=True)
class TfliteModelInfo:
    path: Path
    size_bytes: int
    schema_version: int
    description: str
    subgraphs: tuple[SubgraphInfo, ...]
    buffers: int
    reader: str  # which generated schema module read the file

    @property
    def main(self) -> SubgraphInfo:
        """Subgraph 0: the one the interpreter (and the Edge TPU compiler) starts from."""
        return self.subgraphs[0]


def _schema() -> tuple[ModuleType, str]:
    try:
        import ai_edge_litert.schema_py_generated as schema

        return schema, "ai_edge_litert.schema_py_generated"
    except ImportError:
        pass
    try:
        from tensorflow.lite.python import schema_py_generated as schema  # heavy: only when litert is absent

        return schema, "tensorflow.lite.python.schema_py_generated"
    except ImportError as exc:
        raise VerificationError(
            f"no TFLite flatbuffer schema module available ({exc}); pip install ai-edge-litert"
        ) from exc


def enum_names(enum_cls: type) -> dict[int, str]:
    """value -> name of a schema enum class (BuiltinOperator, TensorType, ...)."""
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def _options(schema: ModuleType, op: Any, option_names: dict[int, str]) -> tuple[str, dict[str, Any]]:
    kind = op.BuiltinOptionsType()
    if not kind:
        return "", {}
    table = op.BuiltinOptions()
    obj = schema.BuiltinOptionsCreator(kind, table) if table is not None else None
    values = {} if obj is None else {_snake(k): _plain(v) for k, v in vars(obj).items()}
    return option_names.get(kind, str(kind)), values


def _buffer_data(schema: ModuleType, model: Any, buf: bytes, index: int) -> memoryview | None:
    if index <= 0 or index >= model.BuffersLength():
        return None
    b = model.Buffers(index)
    if b is None:
        return None
    if b.DataLength():
        return memoryview(b.DataAsNumpy())  # a view into `buf`, no copy
    offset, size = b.Offset(), b.Size()
    if offset > 1 and size > 0:  # models over 2 GB keep buffers after the flatbuffer
        return memoryview(buf)[offset : offset + size]
    return None


def _constant_facts(
    data: memoryview, dtype: str, quant: Quantization | None
) -> tuple[tuple[int, ...] | None, bool | None]:
    if dtype in _INT_DTYPES:
        arr = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
        values = tuple(int(v) for v in arr) if arr.size <= _MAX_VALUES else None
        if quant is not None and len(quant.zero_points) == 1:
            all_zero = bool(np.all(arr == quant.zero_points[0]))
        elif quant is not None and len(quant.zero_points) > 1:
            all_zero = None  # per-channel zero points: not needed by any rule
        else:
            all_zero = not bool(arr.any())
        return values, all_zero
    raw = np.frombuffer(data, dtype=np.uint8)
    if dtype in ("float32", "float16", "float64"):
        floats = np.frombuffer(data, dtype={"float32": "<f4", "float16": "<f2", "float64": "<f8"}[dtype])
        return None, not bool(np.any(floats != 0))
    return None, not bool(raw.any())


def _quantization(t: Any) -> Quantization | None:
    q = t.Quantization()
    if q is None or q.ScaleLength() == 0:
        return None
    scales = tuple(float(s) for s in q.ScaleAsNumpy())
    zps = tuple(int(z) for z in q.ZeroPointAsNumpy()) if q.ZeroPointLength() else (0,) * len(scales)
    return Quantization(scales, zps, int(q.QuantizedDimension()))


def _tensor(schema: ModuleType, model: Any, buf: bytes, t: Any, index: int, dtypes: dict[int, str]) -> TensorInfo:
    shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    sig = tuple(int(d) for d in t.ShapeSignatureAsNumpy()) if t.ShapeSignatureLength() else shape
    dtype = dtypes.get(t.Type(), f"type{t.Type()}").lower()
    quant = _quantization(t)
    data = _buffer_data(schema, model, buf, t.Buffer())
    values, all_zero = (None, None)
    if data is not None and len(data):
        values, all_zero = _constant_facts(data, dtype, quant)
    return TensorInfo(
        index=index,
        name=(t.Name() or b"").decode(errors="replace"),
        dtype=dtype,
        shape=shape,
        shape_signature=sig,
        quantization=quant,
        buffer=int(t.Buffer()),
        buffer_bytes=0 if data is None else len(data),
        values=values,
        all_zero=all_zero,
        is_variable=bool(t.IsVariable()),
    )


def builtin_code(oc: Any) -> int:
    """The builtin operator of a schema OperatorCode: the larger of its two code fields, since older files set
    only DeprecatedBuiltinCode (BuiltinCode reads 0) and newer ones put codes above 127 in BuiltinCode with a
    placeholder (127) in DeprecatedBuiltinCode."""
    return max(int(oc.DeprecatedBuiltinCode()), int(oc.BuiltinCode()))


def _opcodes(schema: ModuleType, model: Any, op_names: dict[int, str]) -> list[tuple[str, int, int, bool]]:
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = builtin_code(oc)
        if code == schema.BuiltinOperator.CUSTOM:
            custom = (oc.CustomCode() or b"").decode(errors="replace") or "CUSTOM"
            codes.append((custom, int(oc.Version()), -1, True))
        else:
            codes.append((op_names.get(code, f"BUILTIN_{code}"), int(oc.Version()), code, False))
    return codes


def _subgraph(
    schema: ModuleType,
    model: Any,
    buf: bytes,
    index: int,
    opcodes: list[tuple[str, int, int, bool]],
    dtypes: dict[int, str],
    option_names: dict[int, str],
) -> SubgraphInfo:
    sg = model.Subgraphs(index)
    tensors = tuple(_tensor(schema, model, buf, sg.Tensors(i), i, dtypes) for i in range(sg.TensorsLength()))
    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        name, version, code, custom = opcodes[op.OpcodeIndex()]
        options_type, options = _options(schema, op, option_names)
        ops.append(
            OperatorInfo(
                index=i,
                name=name,
                version=version,
                builtin_code=code,
                custom=custom,
                inputs=_ints(op.InputsAsNumpy()) if op.InputsLength() else (),
                outputs=_ints(op.OutputsAsNumpy()) if op.OutputsLength() else (),
                options_type=options_type,
                options=options,
            )
        )
    return SubgraphInfo(
        index=index,
        name=(sg.Name() or b"").decode(errors="replace"),
        tensors=tensors,
        operators=tuple(ops),
        inputs=_ints(sg.InputsAsNumpy()) if sg.InputsLength() else (),
        outputs=_ints(sg.OutputsAsNumpy()) if sg.OutputsLength() else (),
    )


def _ints(arr: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in arr)


def read_tflite(path: Path) -> TfliteModelInfo:
    """Read `path` (a .tflite flatbuffer). Raises VerificationError when it is missing or not a TFLite model."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise VerificationError(f"{path}: cannot read the TFLite model ({exc.strerror or exc})") from exc
    if len(buf) < 8 or buf[4:8] != _IDENTIFIER:
        raise VerificationError(
            f"{path}: not a TFLite flatbuffer (file identifier {bytes(buf[4:8])!r}, expected {_IDENTIFIER!r}); "
            "pass the .tflite written by the convert stage"
        )
    schema, reader = _schema()
    op_names = enum_names(schema.BuiltinOperator)
    dtypes = enum_names(schema.TensorType)
    option_names = enum_names(schema.BuiltinOptions)
    try:
        model = schema.Model.GetRootAs(buf, 0)
        opcodes = _opcodes(schema, model, op_names)
        subgraphs = [
            _subgraph(schema, model, buf, s, opcodes, dtypes, option_names) for s in range(model.SubgraphsLength())
        ]
    except (struct.error, IndexError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{path}: corrupt TFLite flatbuffer ({type(exc).__name__}: {exc})") from exc
    if not subgraphs:
        raise VerificationError(f"{path}: the TFLite model has no subgraph")
    return TfliteModelInfo(
        path=path,
        size_bytes=len(buf),
        schema_version=int(model.Version()),
        description=(model.Description() or b"").decode(errors="replace"),
        subgraphs=tuple(subgraphs),
        buffers=int(model.BuffersLength()),
        reader=reader,
    )
