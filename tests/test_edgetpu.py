"""Edge TPU compatibility analysis, flatbuffer reader and edgetpu_compiler wrapper.

- Rules: small .tflite files built here with the TFLite flatbuffer schema (fast, one rule each).
- Real models: two tiny CNNs exported with torch.onnx and converted by onnx2tf (2 onnx2tf runs, module
  fixtures): a ReLU CNN (int8 with int8 I/O: every op maps; its fp32 file: nothing maps) and the same CNN
  with a LeakyReLU (int8 with uint8 I/O: falls back at LEAKY_RELU).
- Compiler: `edgetpu_compiler` cannot be installed here. Its log parser is tested on hand-written logs in the
  real format (tests/data/edgetpu/README.md says where the format comes from); `run_compiler` is tested with
  a stand-in script named edgetpu_compiler put on PATH, and with PATH lacking it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import torch
from ai_edge_litert import schema_py_generated as schema
from tiny_models import CLASSES, has_fashion_mnist, read_fashion_mnist
from torch import nn

from pipeline.data.imageset import ImageSet
from pipeline.edgetpu import CompatReport, analyze, parse_compiler_log, read_tflite, run_compiler
from pipeline.edgetpu.analyze import CPU, CPU_AFTER, CPU_EDGE, TPU
from pipeline.edgetpu.compiler import parse_size
from pipeline.edgetpu.rules import SUPPORTED_OPS
from pipeline.errors import ConversionError, VerificationError
from pipeline.models.spec import ModelSpec

DATA = Path(__file__).parent / "data" / "edgetpu"
log = logging.getLogger(__name__)

# ------------------------------------------------------------------ building small .tflite files by hand


def _tensor(name, dtype, shape, *, sig=None, quant=None, data=None):
    return {"name": name, "dtype": dtype, "shape": shape, "sig": sig, "quant": quant, "data": data}


def _op(name, inputs, outputs, *, version=1, options=None, custom=False):
    return {
        "name": name,
        "inputs": inputs,
        "outputs": outputs,
        "version": version,
        "options": options,
        "custom": custom,
    }


def build_tflite(path: Path, tensors, ops, inputs, outputs, *, extra_subgraphs: int = 0) -> Path:
    """Write a TFLite flatbuffer with one subgraph (plus empty extra ones) through the schema's object API."""
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    model.operatorCodes = []
    codes: dict[tuple[str, int], int] = {}
    sg = schema.SubGraphT()
    sg.tensors, sg.operators, sg.inputs, sg.outputs = [], [], list(inputs), list(outputs)
    for spec in tensors:
        t = schema.TensorT()
        t.name = spec["name"]
        t.type = getattr(schema.TensorType, spec["dtype"].upper())
        t.shape = list(spec["shape"])
        if spec["sig"] is not None:
            t.shapeSignature = list(spec["sig"])
        t.buffer = 0
        if spec["data"] is not None:
            buf = schema.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(spec["data"]).tobytes(), dtype=np.uint8)
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        if spec["quant"] is not None:
            q = schema.QuantizationParametersT()
            q.scale, q.zeroPoint, q.quantizedDimension = spec["quant"]
            t.quantization = q
        sg.tensors.append(t)
    for spec in ops:
        key = (spec["name"], spec["version"])
        if key not in codes:
            oc = schema.OperatorCodeT()
            if spec["custom"]:
                oc.builtinCode = oc.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
                oc.customCode = spec["name"]
            else:
                code = getattr(schema.BuiltinOperator, spec["name"])
                oc.builtinCode, oc.deprecatedBuiltinCode = code, min(code, 127)
            oc.version = spec["version"]
            codes[key] = len(model.operatorCodes)
            model.operatorCodes.append(oc)
        op = schema.OperatorT()
        op.opcodeIndex = codes[key]
        op.inputs, op.outputs = list(spec["inputs"]), list(spec["outputs"])
        if spec["options"] is not None:
            kind, obj = spec["options"]
            op.builtinOptionsType, op.builtinOptions = getattr(schema.BuiltinOptions, kind), obj
        sg.operators.append(op)
    model.subgraphs = [sg]
    for _ in range(extra_subgraphs):
        extra = schema.SubGraphT()
        extra.tensors, extra.operators, extra.inputs, extra.outputs = [], [], [], []
        model.subgraphs.append(extra)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


Q = ([0.05], [0], 0)  # per-tensor int8 quantization


def act(name, shape, dtype="int8", **kw):
    return _tensor(name, dtype, shape, quant=None if dtype.startswith("float") else Q, **kw)


def conv_model(tmp_path: Path, *, name="m.tflite", x_dtype="int8", cout=8, version=3, extra=()):
    """x (1,8,8,4) -> CONV_2D 3x3 (per-channel int8 weights, int32 bias) -> y (tensor 3), then `extra`:
    (tensors, op) pairs whose tensors are appended in order (4, 5, ...); ops use those absolute indices."""
    wq = ([0.01] * cout, [0] * cout, 0)
    tensors = [
        act("x", (1, 8, 8, 4), x_dtype),
        _tensor("w", "int8", (cout, 3, 3, 4), quant=wq, data=np.ones((cout, 3, 3, 4), np.int8)),
        _tensor("b", "int32", (cout,), quant=([0.0005] * cout, [0] * cout, 0), data=np.arange(cout, dtype="<i4")),
        act("y", (1, 8, 8, cout)),
    ]
    opts = schema.Conv2DOptionsT()
    opts.strideW = opts.strideH = opts.dilationWFactor = opts.dilationHFactor = 1
    ops = [_op("CONV_2D", [0, 1, 2], [3], version=version, options=("Conv2DOptions", opts))]
    for extra_tensors, extra_op in extra:
        tensors += extra_tensors
        ops.append(extra_op)
    return build_tflite(tmp_path / name, tensors, ops, [0], [len(tensors) - 1])


# ------------------------------------------------------------------------------------------ reader


def test_reader_reads_ops_versions_dtypes_quantization_and_buffers(tmp_path: Path) -> None:
    path = conv_model(tmp_path, cout=8)
    info = read_tflite(path)
    assert info.reader == "ai_edge_litert.schema_py_generated"
    assert len(info.subgraphs) == 1 and info.size_bytes == path.stat().st_size
    (op,) = info.main.operators
    assert (op.name, op.version, op.custom, op.options_type) == ("CONV_2D", 3, False, "Conv2DOptions")
    assert op.options["dilation_w_factor"] == 1 and op.options["fused_activation_function"] == 0
    x, w, b, y = info.main.tensors
    assert (x.dtype, x.shape, x.shape_signature, x.is_constant) == ("int8", (1, 8, 8, 4), (1, 8, 8, 4), False)
    assert w.buffer_bytes == 8 * 3 * 3 * 4 and w.quantization.kind == "per-channel"
    assert np.allclose(w.quantization.scales, [0.01] * 8) and w.quantization.quantized_dimension == 0
    assert b.dtype == "int32" and b.buffer_bytes == 32 and b.values == tuple(range(8))
    assert x.quantization.kind == "per-tensor" and x.quantization.zero_points == (0,)
    assert not y.is_constant and (info.main.inputs, info.main.outputs) == ((0,), (3,))


def test_reader_does_not_import_tensorflow(tmp_path: Path) -> None:
    path = conv_model(tmp_path)
    code = (
        "import sys; from pipeline.edgetpu import analyze; r = analyze(sys.argv[1]); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; print(r.tpu_ops)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_reader_rejects_files_that_are_not_tflite(tmp_path: Path) -> None:
    bad = tmp_path / "x.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(VerificationError, match="not a TFLite flatbuffer"):
        read_tflite(bad)
    with pytest.raises(VerificationError, match="cannot read"):
        analyze(tmp_path / "missing.tflite")
    good = conv_model(tmp_path).read_bytes()
    for n in (16, len(good) // 2, len(good) - 8):
        bad.write_bytes(good[:n])
        with pytest.raises(VerificationError, match="corrupt TFLite flatbuffer"):
            read_tflite(bad)


# ------------------------------------------------------------------------------------------- rules


def test_supported_table_has_the_documented_core_ops() -> None:
    for op in (
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "FULLY_CONNECTED",
        "AVERAGE_POOL_2D",
        "MAX_POOL_2D",
        "ADD",
        "MUL",
        "CONCATENATION",
        "RESHAPE",
        "SOFTMAX",
        "LOGISTIC",
        "TANH",
        "RELU",
        "RELU6",
        "MEAN",
        "PAD",
        "QUANTIZE",
        "STRIDED_SLICE",
        "SPLIT",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
    ):
        assert op in SUPPORTED_OPS, op
    for op in ("LEAKY_RELU", "HARD_SWISH", "GATHER", "DEQUANTIZE", "ARG_MAX", "BATCH_MATMUL"):
        assert op not in SUPPORTED_OPS, op


def test_a_quantized_conv_maps_and_its_parameters_are_counted(tmp_path: Path) -> None:
    rep = analyze(conv_model(tmp_path, cout=8))
    assert rep.fully_mapped and rep.first_fallback is None and rep.tpu_ops == 1
    assert rep.param_bytes_tpu == rep.param_bytes_total == 8 * 36 + 8 * 4
    assert rep.ops[0].quantization == "per-tensor; weights per-channel"
    assert rep.ops[0].input_dtypes == ("int8", "const int8", "const int32")


def test_parameters_beyond_the_on_chip_memory_stream_off_chip(tmp_path: Path) -> None:
    path = conv_model(tmp_path, cout=512)  # 512*36 int8 weights + 512*4 bias = 20,480 bytes
    rep = analyze(path, sram_mb=16 * 1024 / 2**20)  # 16 KiB of "SRAM"
    assert rep.param_bytes_tpu == 512 * 36 + 512 * 4
    assert (rep.on_chip_bytes, rep.off_chip_bytes) == (16 * 1024, 512 * 40 - 16 * 1024)
    assert "4.00KiB streamed from off-chip memory" in rep.to_markdown()
    assert analyze(path).off_chip_bytes == 0  # the default 8 MiB holds it


def _unary(name, shape_out, *, version=1, options=None, custom=False, sig=None):
    """An op on the conv output (tensor 3) writing tensor 4."""
    return [act(f"{name}_out", shape_out, sig=sig)], _op(
        name, [3], [4], version=version, options=options, custom=custom
    )


def test_first_unsupported_op_and_everything_after_it_fall_back(tmp_path: Path) -> None:
    gather_idx = _tensor("idx", "int32", (2,), data=np.array([0, 1], "<i4"))
    gather = ([gather_idx, act("g", (1, 2, 8, 8))], _op("GATHER", [3, 4], [5]))
    relu = ([act("r", (1, 2, 8, 8))], _op("RELU", [5], [6]))
    rep = analyze(conv_model(tmp_path, extra=[gather, relu]))
    assert [o.placement for o in rep.ops] == [TPU, CPU, CPU_AFTER]
    fb = rep.first_fallback
    assert (fb.op_index, fb.op, fb.ops_after) == (1, "GATHER", 1)
    assert "GATHER" in fb.reasons[0] and "GATHER" in fb.what_to_change[0]
    assert rep.also_failing == ()  # the RELU itself is fine
    assert rep.param_bytes_tpu == 8 * 40 and rep.param_bytes_total == 8 * 40 + 8


def test_dynamic_shape_and_rank_rules(tmp_path: Path) -> None:
    dyn = _unary("RELU", (1, 8, 8, 8), sig=(-1, 8, 8, 8))
    rep = analyze(conv_model(tmp_path, name="dyn.tflite", extra=[dyn]))
    assert rep.first_fallback.op_index == 1
    assert any(i.rule == "static-shape" for i in rep.ops[1].issues)
    assert "fixed input size" in rep.first_fallback.what_to_change[0]

    shape5 = _tensor("s", "int32", (5,), data=np.array([1, 2, 8, 8, 4], "<i4"))
    five_d = ([shape5, act("r5", (1, 2, 8, 8, 4))], _op("RESHAPE", [3, 4], [5]))
    rep = analyze(conv_model(tmp_path, name="rank.tflite", extra=[five_d]))
    assert [i.rule for i in rep.ops[1].issues if i.severity == "error"] == ["rank"]
    assert "3 innermost" in rep.first_fallback.reasons[0]

    shape_ok = _tensor("s", "int32", (5,), data=np.array([1, 1, 8, 8, 8], "<i4"))
    ok = ([shape_ok, act("r5", (1, 1, 8, 8, 8))], _op("RESHAPE", [3, 4], [5]))
    assert analyze(conv_model(tmp_path, name="rank_ok.tflite", extra=[ok])).fully_mapped


def test_float_ops_fail_the_int8_rule_but_edge_conversions_do_not_split_the_graph(tmp_path: Path) -> None:
    tensors = [
        act("xf", (1, 8, 8, 4), "float32"),
        act("xq", (1, 8, 8, 4)),
        act("yq", (1, 8, 8, 4)),
        act("yf", (1, 8, 8, 4), "float32"),
    ]
    ops = [_op("QUANTIZE", [0], [1]), _op("RELU", [1], [2]), _op("DEQUANTIZE", [2], [3])]
    rep = analyze(build_tflite(tmp_path / "edges.tflite", tensors, ops, [0], [3]))
    assert [o.placement for o in rep.ops] == [CPU_EDGE, TPU, CPU_EDGE]
    assert rep.first_fallback is None and not rep.fully_mapped and rep.status.startswith("mapped (model-edge")

    tensors[2] = act("yf_mid", (1, 8, 8, 4), "float32")  # a float op in the middle of an int8 model
    ops = [_op("QUANTIZE", [0], [1]), _op("LOGISTIC", [1], [2]), _op("QUANTIZE", [2], [3])]
    tensors[3] = act("out", (1, 8, 8, 4))
    rep = analyze(build_tflite(tmp_path / "mid.tflite", tensors, ops, [0], [3]))
    assert rep.first_fallback.op == "LOGISTIC" and rep.ops[1].issues[0].rule == "int8"
    assert "output 0 is float32" in rep.first_fallback.reasons[0]
    assert "calibration" in rep.first_fallback.what_to_change[0]


def test_documented_op_limitations(tmp_path: Path) -> None:
    strides = _tensor("st", "int32", (4,), data=np.array([1, 2, 2, 1], "<i4"))
    begin = _tensor("b0", "int32", (4,), data=np.zeros(4, "<i4"))
    end = _tensor("e0", "int32", (4,), data=np.array([1, 8, 8, 8], "<i4"))
    ss = ([begin, end, strides, act("ss", (1, 4, 4, 8))], _op("STRIDED_SLICE", [3, 4, 5, 6], [7]))
    rep = analyze(conv_model(tmp_path, name="ss.tflite", extra=[ss]))
    assert rep.first_fallback.op == "STRIDED_SLICE" and "strides (1, 2, 2, 1)" in rep.first_fallback.reasons[0]

    const = _tensor("c", "int8", (1, 8, 8, 8), quant=Q, data=np.full((1, 8, 8, 8), 3, np.int8))
    cat = ([const, act("cat", (1, 8, 8, 16))], _op("CONCATENATION", [3, 4], [5]))
    rep = analyze(conv_model(tmp_path, name="cat.tflite", extra=[cat]))
    assert rep.first_fallback.op == "CONCATENATION"
    zero = _tensor("z", "int8", (1, 8, 8, 8), quant=Q, data=np.zeros((1, 8, 8, 8), np.int8))
    cat0 = ([zero, act("cat", (1, 8, 8, 16))], _op("CONCATENATION", [3, 4], [5]))
    assert analyze(conv_model(tmp_path, name="cat0.tflite", extra=[cat0])).fully_mapped

    shape = _tensor("s", "int32", (2,), data=np.array([1, 512], "<i4"))
    flat = ([shape, act("flat", (1, 512))], _op("RESHAPE", [3, 4], [5]))
    soft = ([act("p", (1, 512))], _op("SOFTMAX", [5], [6]))
    assert analyze(conv_model(tmp_path, name="sm.tflite", extra=[flat, soft])).fully_mapped
    soft2d = _unary("SOFTMAX", (1, 8, 8, 8))
    rep = analyze(conv_model(tmp_path, name="sm2.tflite", extra=[soft2d]))
    assert rep.first_fallback.op == "SOFTMAX" and "not 1-D" in rep.first_fallback.reasons[0]

    pool = schema.Pool2DOptionsT()
    pool.fusedActivationFunction = schema.ActivationFunctionType.RELU
    mp = _unary("MAX_POOL_2D", (1, 4, 4, 8), options=("Pool2DOptions", pool))
    rep = analyze(conv_model(tmp_path, name="mp.tflite", extra=[mp]))
    assert "fused activation" in rep.first_fallback.reasons[0]

    axes = _tensor("ax", "int32", (1,), data=np.array([0], "<i4"))
    mean_b = ([axes, act("mb", (1, 8, 8, 8))], _op("MEAN", [3, 4], [5]))
    rep = analyze(conv_model(tmp_path, name="mean.tflite", extra=[mean_b]))
    assert "batch" in rep.first_fallback.reasons[0]


def test_custom_and_newer_runtime_ops(tmp_path: Path) -> None:
    custom = _unary("MyCustomOp", (1, 8, 8, 8), custom=True)
    rep = analyze(conv_model(tmp_path, name="c.tflite", extra=[custom]))
    assert rep.ops[1].op == "MyCustomOp" and "custom op MyCustomOp" in rep.first_fallback.reasons[0]

    perm = _tensor("perm", "int32", (4,), data=np.array([0, 2, 1, 3], "<i4"))
    tr = ([perm, act("t", (1, 8, 8, 8))], _op("TRANSPOSE", [3, 4], [5]))
    path = conv_model(tmp_path, name="t.tflite", extra=[tr])
    assert analyze(path).fully_mapped  # runtime 14 (default) has TRANSPOSE
    rep = analyze(path, runtime=13)
    assert rep.first_fallback.op == "TRANSPOSE" and rep.ops[1].issues[0].rule == "runtime"


def test_op_versions_compiler16_refuses_block_the_whole_model(tmp_path: Path) -> None:
    rep = analyze(conv_model(tmp_path, version=6))
    assert [b.rule for b in rep.blockers] == ["op-version"] and "CONV_2D version 6" in rep.blockers[0].message
    assert not rep.fully_mapped and rep.status.startswith("refused")
    assert "Blockers" in rep.to_markdown()
    assert analyze(conv_model(tmp_path, name="v5.tflite", version=5)).blockers == ()


def test_grouped_conv_is_flagged(tmp_path: Path) -> None:
    wq = ([0.01] * 8, [0] * 8, 0)
    tensors = [
        act("x", (1, 8, 8, 8)),
        _tensor("w", "int8", (8, 3, 3, 2), quant=wq, data=np.ones((8, 3, 3, 2), np.int8)),
        act("y", (1, 8, 8, 8)),
    ]
    rep = analyze(build_tflite(tmp_path / "g.tflite", tensors, [_op("CONV_2D", [0, 1, -1], [2], version=6)], [0], [2]))
    assert "grouped convolution (4 groups" in rep.first_fallback.reasons[0]
    assert "groups=1" in rep.first_fallback.what_to_change[0]


def test_other_subgraphs_are_reported(tmp_path: Path) -> None:
    tensors = [act("x", (1, 8, 8, 4)), act("y", (1, 8, 8, 4))]
    path = build_tflite(tmp_path / "sg.tflite", tensors, [_op("RELU", [0], [1])], [0], [1], extra_subgraphs=2)
    rep = analyze(path)
    assert rep.subgraphs == 3 and "only subgraph 0" in rep.warnings[0]


# ------------------------------------------------------------------------------------ compiler log


def test_parse_size_in_compiler_units() -> None:
    assert parse_size("0.00B") == 0
    assert parse_size("7.75KiB") == round(7.75 * 1024)
    assert parse_size("6.86MiB") == round(6.86 * 2**20)
    assert parse_size("n/a") is None


def test_parse_fully_mapped_log() -> None:
    s = parse_compiler_log((DATA / "compiler16_fully_mapped.log").read_text())
    assert s.version == "16.0.384591198" and s.compiled and s.compile_ms == 117
    assert (s.input_model, s.output_model) == ("model_int8.tflite", "model_int8_edgetpu.tflite")
    assert s.on_chip_bytes == round(6.25 * 1024) and s.off_chip_bytes == 0
    assert s.on_chip_remaining_bytes == round(7.98 * 2**20)
    assert (s.edgetpu_subgraphs, s.total_ops) == (1, 9)
    assert (s.ops_on_tpu, s.ops_on_cpu) == (9, 0)  # no count lines when all map: summed from the table
    assert [(r.op, r.count) for r in s.rows][:2] == [("QUANTIZE", 2), ("CONV_2D", 3)]
    assert all(r.mapped for r in s.rows) and s.not_mapped_rows == () and s.errors == ()


def test_parse_partially_mapped_log() -> None:
    s = parse_compiler_log((DATA / "compiler16_partially_mapped.log").read_text())
    assert (s.ops_on_tpu, s.ops_on_cpu, s.total_ops) == (4, 6, 10)
    assert sum(r.count for r in s.rows) == s.total_ops
    assert sum(r.count for r in s.mapped_rows) == 4
    not_mapped = {(r.op, r.status) for r in s.not_mapped_rows}
    assert ("LEAKY_RELU", "Operation not supported") in not_mapped
    assert ("PAD", "More than one subgraph is not supported") in not_mapped
    assert s.operation_log == "model_int8_edgetpu.log"


def test_parse_refused_log() -> None:
    s = parse_compiler_log((DATA / "compiler16_refused_op_version.log").read_text())
    assert not s.compiled and s.rows == () and s.on_chip_bytes is None
    assert s.errors[0].startswith("ERROR: Didn't find op for builtin opcode 'CONV_2D' version '6'")
    assert "Model could not be parsed" in s.errors


# ------------------------------------------------------------------------------- running the compiler

FAKE = """#!{python}
# STAND-IN for Coral's edgetpu_compiler binary (tests only): prints a recorded log, writes a copy of the input
# as <stem>_edgetpu.tflite, exits with the given code.
import shutil, sys, time
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("-o") + 1]) if "-o" in args else Path(".")
model = Path(args[-1])
time.sleep({sleep})
sys.stdout.write(Path({log!r}).read_text())
if {rc} == 0:
    shutil.copyfile(model, out / (model.stem + "_edgetpu.tflite"))
sys.exit({rc})
"""


def _fake_compiler(bin_dir: Path, log: Path, *, rc: int = 0, sleep: float = 0.0) -> Path:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "edgetpu_compiler"
    exe.write_text(FAKE.format(python=sys.executable, log=str(log), rc=rc, sleep=sleep))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_compiler_absent_says_so_plainly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    model = conv_model(tmp_path)
    res = run_compiler(model, tmp_path / "out")
    assert not res.available and res.returncode is None and res.edgetpu_model is None and not res.ok
    assert "edgetpu_compiler is not on PATH, so it was not run" in res.message
    assert not (tmp_path / "out").exists()
    md = analyze(model, compiler=res).to_markdown()
    assert "not on PATH" in md
    with pytest.raises(ConversionError, match="not on PATH"):
        res.raise_for_status()


def test_compiler_stand_in_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_compiler(tmp_path / "bin", DATA / "compiler16_partially_mapped.log")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    model = conv_model(tmp_path, name="model_int8.tflite")
    res = run_compiler(model, tmp_path / "out", min_runtime=14)
    assert res.available and res.ok and res.returncode == 0
    assert res.argv[1:] == ("-s", "-o", str(tmp_path / "out"), "-m", "14", str(model))
    assert res.edgetpu_model == tmp_path / "out" / "model_int8_edgetpu.tflite" and res.edgetpu_model.is_file()
    assert (res.on_chip_bytes, res.off_chip_bytes, res.subgraphs) == (2048, 0, 1)
    assert [r.op for r in res.not_mapped][:2] == ["QUANTIZE", "CONV_2D"]
    assert "4 ops on the Edge TPU, 6 on the CPU" in res.message
    md = analyze(model, compiler=res).to_markdown()
    assert "| LEAKY_RELU | 1 | Operation not supported |" in md
    json.dumps(analyze(model, compiler=res).to_dict())


def test_compiler_stand_in_failure_and_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_compiler(tmp_path / "bin", DATA / "compiler16_refused_op_version.log", rc=1)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    model = conv_model(tmp_path, name="model_int8.tflite")
    res = run_compiler(model, tmp_path / "out")
    assert res.available and res.returncode == 1 and res.edgetpu_model is None and not res.ok
    assert "exit code 1" in res.message and "CONV_2D' version '6'" in res.message
    with pytest.raises(ConversionError, match="exit code 1"):
        res.raise_for_status()

    shutil.rmtree(tmp_path / "bin")
    _fake_compiler(tmp_path / "bin", DATA / "compiler16_fully_mapped.log", sleep=30)
    start = time.perf_counter()
    res = run_compiler(model, tmp_path / "out", timeout_s=0.5)
    assert time.perf_counter() - start < 10
    assert res.returncode is None and "timed out after 0.5 s" in res.message and res.edgetpu_model is None

    with pytest.raises(ConversionError, match="not found"):
        run_compiler(tmp_path / "nope.tflite", tmp_path / "out")


# ------------------------------------------------------------------------- real models through onnx2tf


class TinyCNN(nn.Module):
    """conv-BN-ReLU-maxpool, conv-BN-<act>, strided conv-ReLU, global average pool, linear (1x28x28 input)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.c1 = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.c2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), act)
        self.c3 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c3(self.c2(self.c1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _spec(name: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=lambda: TinyCNN(nn.ReLU()),
        input_shape=(1, 28, 28),
        mean=(0.286,),
        std=(0.353,),
        class_names=CLASSES,
    )


@pytest.fixture(scope="module")
def calibration() -> ImageSet:
    if has_fashion_mnist():
        return read_fashion_mnist("train", 50)
    images = np.random.default_rng(0).integers(0, 256, (50, 28, 28, 1), dtype=np.uint8)
    return ImageSet(images, None, CLASSES, "random uint8 (seed 0)")


def _convert(model: nn.Module, name: str, out: Path, calibration: ImageSet, **kw) -> dict:
    from pipeline.convert.convert_tflite import convert_tflite
    from pipeline.convert.export_onnx import export_onnx

    spec = _spec(name)
    start = time.perf_counter()
    onnx = export_onnx(model.eval(), spec, out / "model.onnx")
    files = convert_tflite(onnx, spec, out, calibration=calibration, **kw)
    log.warning("%s: export + onnx2tf %.1f s", name, time.perf_counter() - start)
    return files


@pytest.fixture(scope="module")
def relu_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(nn.ReLU()).eval()


@pytest.fixture(scope="module")
def relu_files(relu_cnn, calibration, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("relu")
    return _convert(relu_cnn, "relu-cnn", out, calibration, precisions=["fp32", "int8"], int8_io="int8")


@pytest.fixture(scope="module")
def leaky_files(calibration, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("leaky")
    return _convert(TinyCNN(nn.LeakyReLU(0.1)), "leaky-cnn", out, calibration, precisions=["int8"], int8_io="uint8")


def _interpreter_op_counts(path: Path) -> Counter:
    from pipeline.tflite import tflite_io_details

    return Counter({k: v for k, v in tflite_io_details(path)["ops"].items() if k != "DELEGATE"})


def _log_report(rep: CompatReport) -> None:
    log.info("%s", rep.to_markdown())


@pytest.mark.slow
def test_real_int8_cnn_maps_fully(relu_files, relu_cnn) -> None:
    path = relu_files["int8"].path
    rep = analyze(path)
    _log_report(rep)
    assert rep.fully_mapped and rep.first_fallback is None and rep.blockers == ()
    assert rep.tpu_ops == len(rep.ops) and rep.cpu_ops == 0
    names = [o.op for o in rep.ops]
    assert Counter(names)["CONV_2D"] == 3 and "FULLY_CONNECTED" in names and "MAX_POOL_2D" in names
    assert rep.ops[0].op == "CONV_2D" and rep.ops[0].input_dtypes == ("int8", "const int8", "const int32")
    assert all(o.version >= 1 for o in rep.ops)
    # the reader agrees with the LiteRT interpreter on the ops (the interpreter may delegate some to XNNPACK)
    interp = _interpreter_op_counts(path)
    assert all(Counter(names)[k] >= v for k, v in interp.items())
    # parameters: int8 weights = the torch weight count (BN folded), int32 bias = 4 bytes per output channel
    sg = read_tflite(path).main
    weights = sum(t.buffer_bytes for t in sg.tensors if t.is_constant and t.dtype == "int8")
    torch_weights = sum(m.weight.numel() for m in relu_cnn.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights == torch_weights == 8 * 9 + 16 * 72 + 16 * 144 + 160
    assert rep.param_bytes_tpu == rep.param_bytes_total >= weights + 4 * (8 + 16 + 16 + 10)
    assert rep.off_chip_bytes == 0 and rep.on_chip_bytes == rep.param_bytes_tpu


@pytest.mark.slow
def test_real_fp32_model_falls_back_at_its_first_op(relu_files) -> None:
    rep = analyze(relu_files["fp32"].path)
    _log_report(rep)
    assert rep.tpu_ops == 0 and rep.param_bytes_tpu == 0 and rep.param_bytes_total > 0
    fb = rep.first_fallback
    assert fb.op_index == 0 and fb.ops_after == len(rep.ops) - 1
    assert rep.ops[0].placement == CPU and {o.placement for o in rep.ops[1:]} == {CPU_AFTER}
    assert "input 0 is float32" in fb.reasons[0]
    assert "not quantized" in fb.what_to_change[0]
    assert all(o.quantization == "none" for o in rep.ops)


@pytest.mark.slow
def test_real_leaky_relu_model_falls_back_at_leaky_relu(leaky_files, tmp_path: Path) -> None:
    path = leaky_files["int8"].path
    rep = analyze(path)
    _log_report(rep)
    fb = rep.first_fallback
    assert fb is not None and fb.op == "LEAKY_RELU" and rep.ops[fb.op_index].version >= 1
    assert "LEAKY_RELU is not in the Edge TPU's supported-op table" in fb.reasons
    assert "nn.LeakyReLU" in fb.what_to_change[0]
    before, after = rep.ops[: fb.op_index], rep.ops[fb.op_index + 1 :]
    assert before and all(o.placement == TPU for o in before)
    assert after and all(o.placement == CPU_AFTER for o in after) and fb.ops_after == len(after)
    assert rep.also_failing == ()  # everything after it would map on its own
    assert {o.op for o in after} >= {"CONV_2D", "FULLY_CONNECTED"}
    assert (rep.ops[0].op, rep.ops[0].input_dtypes) == ("QUANTIZE", ("uint8",))  # uint8 input, requantized on the TPU
    assert 0 < rep.param_bytes_tpu < rep.param_bytes_total
    md = rep.to_markdown()
    assert f"| {fb.op_index} | LEAKY_RELU | " in md and "| no |" in md and "CPU after fallback" in md
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["first_fallback"]["op"] == "LEAKY_RELU" and len(data["ops"]) == len(rep.ops)

    # with the stand-in compiler on PATH the compiler's table lands in the same report
    _fake_compiler(tmp_path / "bin", DATA / "compiler16_partially_mapped.log")
    old = os.environ["PATH"]
    os.environ["PATH"] = str(tmp_path / "bin")
    try:
        res = run_compiler(path, tmp_path / "out")
    finally:
        os.environ["PATH"] = old
    assert res.ok and res.edgetpu_model.name == "model_int8_edgetpu.tflite"
    md = analyze(path, compiler=res).to_markdown()
    # the hand-written log was written for this model (uint8 I/O), so both sides show 4 / 6
    assert "ops on the Edge TPU: 4, on the CPU: 6 (this analysis: 4 / 6)" in md


# ------------------------------------------------------------------ feedback to PyTorch, fixes, the deploy stage


def test_fixes_are_chosen_from_the_onnx_graph(tmp_path: Path) -> None:
    from pipeline.convert.export_onnx import export_onnx
    from pipeline.edgetpu.fixes import edgetpu_fixes

    found = {}
    for name, act in (("relu", nn.ReLU()), ("leaky", nn.LeakyReLU(0.1)), ("hswish", nn.Hardswish())):
        torch.manual_seed(0)
        onnx = export_onnx(TinyCNN(act).eval(), _spec(name), tmp_path / name / "model.onnx")
        found[name] = edgetpu_fixes(onnx.path)
    assert found["relu"].args == () and found["relu"].notes == ()
    assert found["leaky"].args == ("-rtpo", "LeakyReLU") and "LeakyReLU rewritten" in found["leaky"].notes[0]
    assert found["hswish"].args == ("-rtpo", "HardSwish")


@pytest.mark.slow
def test_attribution_names_the_pytorch_layer_of_every_weighted_op(relu_files, relu_cnn) -> None:
    from pipeline.edgetpu.attribution import attribute_ops

    refs = attribute_ops(relu_files["int8"].path, relu_cnn, torch.zeros(1, 1, 28, 28))
    ops = [o.name for o in read_tflite(relu_files["int8"].path).main.operators]
    assert len(refs) == len(ops)
    weighted = [(ops[r.op_index], r.layer, r.how) for r in refs if ops[r.op_index] in ("CONV_2D", "FULLY_CONNECTED")]
    assert weighted == [
        ("CONV_2D", "c1.0", "weight shape"),
        ("CONV_2D", "c2.0", "weight shape"),
        ("CONV_2D", "c3.0", "weight shape"),
        ("FULLY_CONNECTED", "fc", "weight shape"),
    ]
    pool = next(r for r in refs if ops[r.op_index] == "MAX_POOL_2D")
    assert (pool.layer, pool.how) == ("c1.3", "module type order")


@pytest.mark.slow
def test_stage_points_a_fallback_at_its_pytorch_layer_and_the_fix_removes_it(
    leaky_files, calibration, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.convert.convert_tflite import convert_tflite
    from pipeline.convert.export_onnx import export_onnx
    from pipeline.edgetpu.fixes import edgetpu_fixes
    from pipeline.edgetpu.run import run_edgetpu_stage
    from pipeline.verification import verify_tflite

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty") + os.pathsep + str(Path(sys.executable).parent))
    torch.manual_seed(0)
    model = TinyCNN(nn.LeakyReLU(0.1)).eval()  # the same seeded weights as leaky_files
    ex = torch.zeros(1, 1, 28, 28)

    # without the fix: LEAKY_RELU falls back, and the report names nn.LeakyReLU at c2.2
    out = run_edgetpu_stage(leaky_files["int8"].path, model, ex, tmp_path / "plain", sram_mb=8.0, fixes={})
    assert not out["fully_mapped"] and out["first_fallback"]["op"] == "LEAKY_RELU"
    assert out["first_fallback"]["pytorch_layer"] == "c2.2"
    row = out["layer_feedback"][0]
    assert row["layer"] == "c2.2" and row["layer_type"] == "LeakyReLU" and "nn.LeakyReLU" in row["what_to_change"][0]
    md = (tmp_path / "plain" / "edgetpu.md").read_text()
    assert "comes from PyTorch layer `c2.2` (LeakyReLU)" in md and "| **no** | `c2.2` |" in md
    assert not out["compiler"]["available"] and out["edgetpu_model"] is None
    assert json.loads((tmp_path / "plain" / "edgetpu.json").read_text())["analysis"]["ops"][0]["index"] == 0

    # with the fix the pipeline applies for Edge TPU targets: fully mapped, and still the same model
    onnx = export_onnx(model, _spec("leaky-fixed"), tmp_path / "fixed" / "model.onnx")
    fixes = edgetpu_fixes(onnx.path)
    files = convert_tflite(onnx, _spec("leaky-fixed"), tmp_path / "fixed", precisions=["int8"],
                           calibration=calibration, int8_io="uint8", extra_args=fixes.args)  # fmt: skip
    fixed = run_edgetpu_stage(files["int8"].path, model, ex, tmp_path / "fixed-tpu", sram_mb=8.0,
                              fixes=fixes.to_dict())  # fmt: skip
    assert fixed["fully_mapped"] and fixed["cpu_ops"] == 0 and fixed["layer_feedback"] == []
    assert "LEAKY_RELU" not in [o.op for o in analyze(files["int8"].path).ops]
    assert "Fixed during conversion: LeakyRelu" in (tmp_path / "fixed-tpu" / "edgetpu.md").read_text()
    parity = verify_tflite(files, model, _spec("leaky-fixed"), calibration).precisions[0]
    assert parity.agreement >= 0.9, parity


def test_stage_ships_the_compiled_model_when_the_compiler_is_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.edgetpu.run import run_edgetpu_stage

    _fake_compiler(tmp_path / "bin", DATA / "compiler16_fully_mapped.log")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    model_path = conv_model(tmp_path, name="model_int8.tflite")
    torch.manual_seed(0)
    out = run_edgetpu_stage(model_path, nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), torch.zeros(1, 4, 8, 8),
                            tmp_path / "stage", sram_mb=8.0, fixes={})  # fmt: skip
    assert out["compiler"]["available"] and out["compiler"]["ok"] and out["edgetpu_model"] == "model_edgetpu.tflite"
    assert (tmp_path / "stage" / "model_edgetpu.tflite").read_bytes() == model_path.read_bytes()
    assert "### edgetpu_compiler" in (tmp_path / "stage" / "edgetpu.md").read_text()

    _fake_compiler(tmp_path / "bin", DATA / "compiler16_refused_op_version.log", rc=1)
    with pytest.raises(ConversionError):
        run_edgetpu_stage(model_path, nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), torch.zeros(1, 4, 8, 8),
                          tmp_path / "stage2", sram_mb=8.0, fixes={})  # fmt: skip
