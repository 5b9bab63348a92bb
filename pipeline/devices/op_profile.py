"""Per-op time of a model on the device: op index, type, ms, share of the whole, and the PyTorch layer behind it.

The Python TFLite interpreters (ai-edge-litert, tflite-runtime, tf.lite) expose no op profiler, so the figures
come from TFLite's `benchmark_model --enable_op_profiling=true`, where the device has that binary (Android
vendors ship it, and it can be copied to any Linux board). Its "Operator-wise Profiling Info for Regular
Benchmark Runs" section is a StatsCalculator table (tensorflow/core/util/stats_calculator.cc, fed by
tensorflow/lite/profiling/profile_summarizer.cc), one row per node in run order:

    [node type]  [start]  [first]  [avg ms]  [%]  [cdf%]  [mem KB]  [times called]  [Name]

`[start]` is gone in newer builds (xla/tsl/util/stats_calculator.cc); lines may carry an `INFO: ` or logcat
prefix. Row names: `[output tensors]:N` for an interpreter op (N = its node index = the op index in the
.tflite), `Delegate/<xnnpack op>:N` for ops inside a delegate when the delegate profiles them (N is the
delegate's own numbering, not a .tflite op index), and e.g. `TfLiteXNNPackDelegate` rows for a delegated
partition as a whole. `avg ms` is per call: an op's time per inference is avg ms x times called.
"""

from __future__ import annotations

import logging
import posixpath
import re
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.devices.benchmark_model import benchmark_model_argv, parse_benchmark_model
from pipeline.devices.transport import Transport
from pipeline.errors import DeviceError

log = logging.getLogger(__name__)

SECTION = "Operator-wise Profiling Info for Regular Benchmark Runs"
_PREFIX = re.compile(r"^(?:.*?\b[IWE] tflite\s*:\s?|INFO:\s?)")
_F = r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_ROW = r"^\s*(?P<type>\S.*?)\s+{start}(?P<first>{f})\s+(?P<avg>{f})\s+(?P<pct>{f})%\s+(?P<cdf>{f})%\s+(?P<mem>{f})\s+(?P<called>\d+)\s+(?P<name>\S.*?)\s*$"  # noqa: E501
_OP_NAME = re.compile(r"\]:(\d+)$")
_DELEGATE_NAME = re.compile(r"^Delegate/(.+):(\d+)$")
# XNNPACK's operator names -> the TFLite builtin they come from (pairs made only when the counts agree)
XNNPACK_KIND = (
    ("DWConv", "DEPTHWISE_CONV_2D"),
    ("Deconvolution", "TRANSPOSE_CONV"),
    ("Convolution", "CONV_2D"),
    ("Fully Connected", "FULLY_CONNECTED"),
    ("Max Pooling", "MAX_POOL_2D"),
    ("Global Average Pooling", "MEAN"),
    ("Average Pooling", "AVERAGE_POOL_2D"),
    ("Add", "ADD"),
    ("Multiply", "MUL"),
    ("Softmax", "SOFTMAX"),
    ("Sigmoid", "LOGISTIC"),
    ("HardSwish", "HARD_SWISH"),
    ("Leaky ReLU", "LEAKY_RELU"),
)


@dataclass(frozen=True)
class OpTime:
    """One row of the op profile."""

    run_order: int
    type: str  # the node type as printed (CONV_2D, "Convolution (NHWC, F32) IGEMM", TfLiteXNNPackDelegate)
    name: str
    op_index: int | None  # the .tflite op index (interpreter ops), None inside a delegate
    delegate_index: int | None  # the delegate's own op number for `Delegate/...` rows
    first_ms: float
    avg_ms: float  # per call
    times_called: int  # per inference
    ms: float  # per inference: avg_ms x times_called
    share: float  # of the profiled total (the tool's [%] column / 100)


def _strip(line: str) -> str:
    return _PREFIX.sub("", line.rstrip("\n"), count=1)


def parse_op_profile(output: str) -> list[OpTime]:
    """The run-order table of benchmark_model's op profile; a DeviceError when the output has none."""
    lines = [_strip(x) for x in output.splitlines()]
    try:
        at = next(i for i, x in enumerate(lines) if SECTION in x)
        head = next(i for i in range(at, len(lines)) if "[node type]" in lines[i])
    except StopIteration:
        raise DeviceError(
            f"benchmark_model printed no op profile (no '{SECTION}' table; was --enable_op_profiling=true "
            f"given?); its output ended with: {output.strip()[-400:]!r}"
        ) from None
    start = r"(?P<start>{f})\s+" if "[start]" in lines[head] else ""
    row = re.compile(_ROW.format(start=start.format(f=_F), f=_F))
    ops = []
    for text in lines[head + 1 :]:
        if not text.strip() or text.lstrip().startswith("="):
            break
        m = row.match(text)
        if m is None:
            raise DeviceError(f"benchmark_model op profile: cannot read the row {text.strip()!r}")
        name = m["name"]
        op = _OP_NAME.search(name) if not name.startswith("Delegate/") else None
        dm = _DELEGATE_NAME.match(name)
        avg, called = float(m["avg"]), int(m["called"])
        ops.append(OpTime(len(ops), m["type"].strip(), name, int(op[1]) if op else None, int(dm[2]) if dm else None,
                          float(m["first"]), avg, called, round(avg * called, 6), float(m["pct"]) / 100))  # fmt: skip
    if not ops:
        raise DeviceError("benchmark_model op profile: the run-order table has no rows")
    return ops


def _tflite_kind(xnnpack_type: str) -> str | None:
    return next((builtin for word, builtin in XNNPACK_KIND if word in xnnpack_type), None)


def link_layers(ops: Sequence[OpTime], op_names: Sequence[str], layers: Mapping[int, tuple[str | None, str]]
                ) -> list[dict[str, Any]]:  # fmt: skip
    """Each row with the .tflite op it is and the PyTorch layer behind it. `op_names`: builtin name per .tflite op
    index; `layers`: op index -> (PyTorch layer or None, how it was matched) from pipeline.edgetpu.attribution.
    A delegate row is paired with the .tflite ops of its kind in order, only when both counts agree."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, n in enumerate(op_names):
        by_kind[n].append(i)
    rows_of_kind: dict[str, list[OpTime]] = defaultdict(list)
    for o in ops:
        if o.delegate_index is not None and (kind := _tflite_kind(o.type)):
            rows_of_kind[kind].append(o)
    paired: dict[int, tuple[int, str]] = {}
    for kind, rows in rows_of_kind.items():
        if len(rows) == len(by_kind.get(kind, ())):
            pairs = zip(rows, by_kind[kind], strict=True)
            paired.update({o.run_order: (i, "delegate op, paired by kind order") for o, i in pairs})
    out = []
    for o in ops:
        index, how = (o.op_index, "op index") if o.op_index is not None else paired.get(o.run_order, (None, ""))
        if index is not None and index >= len(op_names):
            index, how = None, "a delegated partition (several ops)"
        layer, layer_how = layers.get(index, (None, "")) if index is not None else (None, "")
        out.append({**asdict(o), "tflite_op": index, "tflite_type": op_names[index] if index is not None else None,
                    "link": how or "unlinked", "layer": layer, "layer_match": layer_how or None})  # fmt: skip
    return out


def find_benchmark_model(transport: Transport, *, candidates: Sequence[str] = ()) -> str | None:
    """The device path of a benchmark_model binary: on PATH, in the workdir, or in /data/local/tmp."""
    paths = [*candidates, posixpath.join(transport.workdir, "benchmark_model"), "/data/local/tmp/benchmark_model"]
    script = 'command -v benchmark_model && exit 0; for p in "$@"; do [ -x "$p" ] && echo "$p" && exit 0; done; exit 1'
    try:
        done = transport.run(["sh", "-c", script, "sh", *paths], timeout_s=60)
    except DeviceError:
        return None
    found = done.stdout.strip().splitlines()
    return found[0] if done.rc == 0 and found else None


def op_profile_on_device(transport: Transport, model: Path, *, binary: str, threads: int, runs: int = 50,
                         warmup: int = 5, timeout_s: float = 600.0) -> dict[str, Any]:  # fmt: skip
    """Copy `model` to the device, run benchmark_model with the op profiler, parse it, clean up."""
    where = transport.describe()
    folder = posixpath.join(transport.workdir, f"ops-{uuid.uuid4().hex[:10]}")
    remote = posixpath.join(folder, "model.tflite")
    try:
        transport.run(["mkdir", "-p", folder], timeout_s=60)
        transport.push(model, remote, timeout_s=max(60.0, timeout_s / 4))
        argv = benchmark_model_argv(binary, remote, threads=threads, warmup=warmup, runs=runs, min_seconds=0.0,
                                    max_seconds=timeout_s / 2, extra=["--enable_op_profiling=true"])  # fmt: skip
        done = transport.run(argv, timeout_s=timeout_s)
        if done.rc != 0:
            raise DeviceError(
                f"benchmark_model on {where} failed (exit {done.rc}): {(done.stderr + done.stdout)[-600:]}"
            )
        text = done.stdout + "\n" + done.stderr
        return {"ops": parse_op_profile(text), "latency": parse_benchmark_model(text)}
    finally:
        try:
            transport.run(["rm", "-rf", folder], timeout_s=60)
        except DeviceError as exc:
            log.warning("could not remove %s on %s: %s", folder, where, exc)


def profile_ops(model_tflite: Path, transport: Transport, *, threads: int, torch_model: Any = None,
                example: Any = None, binary: str | None = None, timeout_s: float = 600.0
                ) -> dict[str, Any]:  # fmt: skip
    """The per-op profile of `model_tflite` on the device, linked to the PyTorch layers of `torch_model` when
    given. Never raises for the device: {"available": False, "why": ...} says what is missing."""
    where = transport.describe()
    binary = binary or find_benchmark_model(transport)
    if binary is None:
        return {"available": False, "device": where, "why": (
            f"no benchmark_model binary on {where}, and the Python TFLite interpreters have no op profiler: copy "
            "TFLite's benchmark_model (built for the device's CPU) onto its PATH or into "
            f"{transport.workdir} for per-op times")}  # fmt: skip
    try:
        prof = op_profile_on_device(transport, model_tflite, binary=binary, threads=threads, timeout_s=timeout_s)
    except DeviceError as exc:
        return {"available": False, "device": where, "why": str(exc)}
    from pipeline.edgetpu.tflite_model import read_tflite

    op_names = [op.name for op in read_tflite(model_tflite).main.operators]
    layers: dict[int, tuple[str | None, str]] = {}
    if torch_model is not None:
        from pipeline.edgetpu.attribution import attribute_ops

        try:
            layers = {r.op_index: (r.layer, r.how) for r in attribute_ops(model_tflite, torch_model, example)}
        except Exception as exc:  # best effort: the times stand without the layer names
            log.warning("linking %s's ops to PyTorch layers failed: %s", model_tflite.name, exc)
    ops = link_layers(prof["ops"], op_names, layers)
    return {"available": True, "device": where, "tool": f"{binary} --enable_op_profiling=true", "threads": threads,
            "ops": ops, "total_ms": round(sum(o["ms"] for o in ops), 6),
            "latency_ms": prof["latency"]["latency_ms"]}  # fmt: skip
