"""Edge TPU compatibility of a .tflite file, from the file alone (no compiler, no device).

`analyze(path)` reads the flatbuffer, checks every op of the main subgraph against the published rules
(`rules.py`), then applies the compiler's partitioning rule: ops map in execution order until the first op that
cannot; that op and everything after it run on the CPU. Two edge cases are not fallbacks: a QUANTIZE that
converts a float model input to int8 and a DEQUANTIZE that produces a float model output run on the CPU around
the Edge TPU part without splitting it (real compiler logs show them unmapped while the rest maps).

Parameter memory: the constant buffers (weights, bias) read by the ops that map, against the on-chip SRAM
(`sram_mb`, about 8 MB on every Edge TPU). What exceeds it is streamed from host memory on every inference.
The compiler re-lays weights out and reserves some SRAM for other data, so its own figures differ somewhat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.edgetpu.compiler import CompilerResult
from pipeline.edgetpu.rules import (
    DEFAULT_RUNTIME,
    DOC_URL,
    Issue,
    check_op_version,
    check_operator,
    hint_for,
)
from pipeline.edgetpu.tflite_model import OperatorInfo, SubgraphInfo, read_tflite

MIB = 1024 * 1024
TPU, CPU, CPU_AFTER, CPU_EDGE = "tpu", "cpu", "cpu-after-fallback", "cpu-edge"
_PLACEMENT_TEXT = {TPU: "yes", CPU: "no", CPU_AFTER: "CPU after fallback", CPU_EDGE: "CPU (model edge)"}

__all__ = ["CompatReport", "Fallback", "Issue", "OpReport", "analyze", "format_bytes"]


@dataclass(frozen=True)
class OpReport:
    index: int  # execution order in the main subgraph
    op: str
    version: int
    input_dtypes: tuple[str, ...]  # "int8" for activations, "const int32" for constants
    output_dtypes: tuple[str, ...]
    quantization: str  # e.g. "per-tensor; weights per-channel", "none"
    placement: str  # tpu | cpu | cpu-after-fallback | cpu-edge
    reason: str  # why not on the TPU (empty when it maps); warnings otherwise
    issues: tuple[Issue, ...]
    param_bytes: int  # constant buffers this op reads (shared buffers counted at their first use)

    @property
    def maps(self) -> bool:
        return self.placement == TPU


@dataclass(frozen=True)
class Fallback:
    """The first op that falls back to the CPU, why, and what to change."""

    op_index: int
    op: str
    reasons: tuple[str, ...]
    what_to_change: tuple[str, ...]
    ops_after: int  # ops forced onto the CPU after it


@dataclass(frozen=True)
class CompatReport:
    model: Path
    model_bytes: int
    reader: str
    runtime: int
    subgraphs: int
    ops: tuple[OpReport, ...]
    first_fallback: Fallback | None
    also_failing: tuple[int, ...]  # ops after the first fallback that break a rule themselves
    blockers: tuple[Issue, ...]  # model-level: the compiler would refuse the whole model
    warnings: tuple[str, ...]
    param_bytes_total: int
    param_bytes_tpu: int
    sram_bytes: int
    compiler: CompilerResult | None = None

    @property
    def tpu_ops(self) -> int:
        return sum(1 for o in self.ops if o.placement == TPU)

    @property
    def cpu_ops(self) -> int:
        return len(self.ops) - self.tpu_ops

    @property
    def on_chip_bytes(self) -> int:
        return min(self.param_bytes_tpu, self.sram_bytes)

    @property
    def off_chip_bytes(self) -> int:
        """Parameters that do not fit the on-chip SRAM: streamed from host memory on every inference."""
        return max(0, self.param_bytes_tpu - self.sram_bytes)

    @property
    def fully_mapped(self) -> bool:
        return not self.blockers and all(o.placement == TPU for o in self.ops)

    @property
    def status(self) -> str:
        if self.blockers:
            return "refused by edgetpu_compiler 16 (see blockers)"
        if self.first_fallback is None:
            edge = sum(1 for o in self.ops if o.placement == CPU_EDGE)
            return "fully mapped" if not edge else f"mapped (model-edge conversions on the CPU: {edge})"
        fb = self.first_fallback
        if self.tpu_ops == 0:
            return f"nothing maps: first op #{fb.op_index} {fb.op} falls back"
        return f"partially mapped: falls back at op #{fb.op_index} {fb.op}"

    def to_dict(self) -> dict[str, Any]:
        fb = self.first_fallback
        return {
            "model": str(self.model),
            "model_bytes": self.model_bytes,
            "reader": self.reader,
            "runtime": self.runtime,
            "subgraphs": self.subgraphs,
            "status": self.status,
            "fully_mapped": self.fully_mapped,
            "tpu_ops": self.tpu_ops,
            "cpu_ops": self.cpu_ops,
            "first_fallback": None
            if fb is None
            else {
                "op_index": fb.op_index,
                "op": fb.op,
                "reasons": list(fb.reasons),
                "what_to_change": list(fb.what_to_change),
                "ops_after": fb.ops_after,
            },
            "also_failing": list(self.also_failing),
            "blockers": [_issue_dict(i) for i in self.blockers],
            "warnings": list(self.warnings),
            "memory": {
                "param_bytes_total": self.param_bytes_total,
                "param_bytes_tpu": self.param_bytes_tpu,
                "sram_bytes": self.sram_bytes,
                "on_chip_bytes": self.on_chip_bytes,
                "off_chip_bytes": self.off_chip_bytes,
            },
            "ops": [
                {
                    "index": o.index,
                    "op": o.op,
                    "version": o.version,
                    "input_dtypes": list(o.input_dtypes),
                    "output_dtypes": list(o.output_dtypes),
                    "quantization": o.quantization,
                    "placement": o.placement,
                    "reason": o.reason,
                    "issues": [_issue_dict(i) for i in o.issues],
                    "param_bytes": o.param_bytes,
                }
                for o in self.ops
            ],
            "compiler": None if self.compiler is None else self.compiler.to_dict(),
        }

    def to_markdown(self) -> str:
        return "\n".join(_markdown(self)) + "\n"


def _issue_dict(i: Issue) -> dict[str, str]:
    return {"rule": i.rule, "severity": i.severity, "message": i.message, "hint": i.hint}


def format_bytes(n: int | None) -> str:
    """Bytes in the compiler's style: 0.00B, 7.75KiB, 6.86MiB."""
    if n is None:
        return "n/a"
    if n < 1024:
        return f"{n:.2f}B"
    if n < MIB:
        return f"{n / 1024:.2f}KiB"
    return f"{n / MIB:.2f}MiB"


# ------------------------------------------------------------------------------------------------ analysis


def _dtype_labels(sg: SubgraphInfo, idxs: tuple[int, ...]) -> tuple[str, ...]:
    out = []
    for i in idxs:
        t = sg.tensor(i)
        if t is not None:
            out.append(f"const {t.dtype}" if t.is_constant else t.dtype)
    return tuple(out)


def _quant_label(op: OperatorInfo, sg: SubgraphInfo) -> str:
    acts, weights = set(), set()
    for t in sg.op_inputs(op) + sg.op_outputs(op):
        if t.quantization is None or t.dtype not in ("int8", "uint8", "int16"):
            continue
        (weights if t.is_constant else acts).add(t.quantization.kind)
    if not acts and not weights:
        return "none"
    parts = ["/".join(sorted(acts))] if acts else []
    if weights:
        parts.append("weights " + "/".join(sorted(weights)))
    return "; ".join(parts)


def _is_edge(op: OperatorInfo, sg: SubgraphInfo, issues: list[Issue]) -> bool:
    """Float->int8 QUANTIZE of a model input, or int8->float DEQUANTIZE into a model output."""
    errors = [i for i in issues if i.severity == "error"]
    if op.name == "QUANTIZE":
        return set(op.inputs) <= set(sg.inputs) and all(i.rule == "int8" for i in errors)
    if op.name == "DEQUANTIZE":
        return set(op.outputs) <= set(sg.outputs)
    return False


def _is_float_model(sg: SubgraphInfo) -> bool:
    acts = [t for t in sg.tensors if not t.is_constant]
    return bool(acts) and all(t.dtype in ("float32", "float16") for t in acts)


def _param_bytes(sg: SubgraphInfo, seen: set[int], op: OperatorInfo) -> int:
    total = 0
    for t in sg.op_inputs(op):
        if t.is_constant and t.buffer not in seen:
            seen.add(t.buffer)
            total += t.buffer_bytes
    return total


def _partition(checked: list[tuple[OperatorInfo, list[Issue]]], sg: SubgraphInfo) -> tuple[int | None, set[int]]:
    """(index of the first op that falls back or None, indices of model-edge conversions run on the CPU)."""
    edges: set[int] = set()
    for op, issues in checked:
        if not any(i.severity == "error" for i in issues):
            continue
        if not _is_edge(op, sg, issues):
            return op.index, edges
        edges.add(op.index)
    return None, edges


def _placement(
    op: OperatorInfo, issues: list[Issue], first: int | None, edges: set[int], sg: SubgraphInfo
) -> tuple[str, str]:
    """(placement, reason) of one op given the partition."""
    errors = [i.message for i in issues if i.severity == "error"]
    if op.index in edges:
        return CPU_EDGE, "float model input/output conversion, runs on the CPU around the TPU part"
    if first is None or op.index < first:
        return TPU, "; ".join("warning: " + i.message for i in issues if i.severity == "warning")
    if op.index == first:
        return CPU, "; ".join(errors)
    reason = f"after the fallback at #{first} ({sg.operators[first].name})"
    return CPU_AFTER, reason + ("; also: " + "; ".join(errors) if errors else "")


def _fallback(first: int, issues: list[Issue], sg: SubgraphInfo) -> Fallback:
    errors = [i for i in issues if i.severity == "error"]
    name = sg.operators[first].name
    float_model = _is_float_model(sg)
    hints = [hint_for(name, "int8", float_model=True) if float_model and e.rule == "int8" else e.hint for e in errors]
    return Fallback(
        op_index=first,
        op=name,
        reasons=tuple(e.message for e in errors),
        what_to_change=tuple(dict.fromkeys(hints)),
        ops_after=len(sg.operators) - first - 1,
    )


def analyze(
    path: Path,
    *,
    sram_mb: float = 8.0,
    runtime: int = DEFAULT_RUNTIME,
    compiler: CompilerResult | None = None,
) -> CompatReport:
    """Check `path` against the Edge TPU rules. `sram_mb` is the on-chip memory in MiB; `runtime` the Edge TPU
    runtime version the device has (ops newer than it fall back); `compiler`, when given, is rendered with it.

    Raises VerificationError when the file is not a readable TFLite model.
    """
    info = read_tflite(Path(path))
    sg = info.main
    checked = [(op, check_operator(op, sg, runtime=runtime)) for op in sg.operators]
    first, edges = _partition(checked, sg)
    ops: list[OpReport] = []
    seen_buffers: set[int] = set()
    for op, issues in checked:
        placement, reason = _placement(op, issues, first, edges, sg)
        ops.append(
            OpReport(
                index=op.index,
                op=op.name,
                version=op.version,
                input_dtypes=_dtype_labels(sg, op.inputs),
                output_dtypes=_dtype_labels(sg, op.outputs),
                quantization=_quant_label(op, sg),
                placement=placement,
                reason=reason,
                issues=tuple(issues),
                param_bytes=_param_bytes(sg, seen_buffers, op),
            )
        )
    also_failing = tuple(
        o.index for o in ops if o.placement == CPU_AFTER and any(i.severity == "error" for i in o.issues)
    )
    return CompatReport(
        model=info.path,
        model_bytes=info.size_bytes,
        reader=info.reader,
        runtime=runtime,
        subgraphs=len(info.subgraphs),
        ops=tuple(ops),
        first_fallback=None if first is None else _fallback(first, checked[first][1], sg),
        also_failing=also_failing,
        blockers=_blockers(info.subgraphs),
        warnings=_warnings(info.subgraphs, ops),
        param_bytes_total=sum({t.buffer: t.buffer_bytes for t in sg.tensors if t.is_constant}.values()),
        param_bytes_tpu=sum(o.param_bytes for o in ops if o.placement == TPU),
        sram_bytes=round(sram_mb * MIB),
        compiler=compiler,
    )


def _blockers(subgraphs: tuple[SubgraphInfo, ...]) -> tuple[Issue, ...]:
    seen: dict[tuple[str, int], Issue] = {}
    for sg in subgraphs:
        for op in sg.operators:
            key = (op.name, op.version)
            if key not in seen and (issue := check_op_version(op.name, op.version)) is not None:
                seen[key] = issue
    return tuple(seen.values())


def _warnings(subgraphs: tuple[SubgraphInfo, ...], ops: list[OpReport]) -> tuple[str, ...]:
    out = []
    if len(subgraphs) > 1:
        extra = sum(len(s.operators) for s in subgraphs[1:])
        out.append(
            f"{len(subgraphs)} subgraphs (control flow): only subgraph 0 is analyzed; the {extra} ops of the others "
            "run on the CPU"
        )
    for o in ops:
        for i in o.issues:
            if i.severity == "warning":
                out.append(f"#{o.index} {o.op}: {i.message} ({i.hint})")
    return tuple(out)


# ------------------------------------------------------------------------------------------------ markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown(r: CompatReport) -> list[str]:
    out = [
        f"## Edge TPU compatibility: `{r.model.name}`",
        "",
        f"- Status: **{r.status}** ({r.tpu_ops} of {len(r.ops)} ops on the Edge TPU, {r.cpu_ops} on the CPU)",
        f"- Checked against the published rules ({DOC_URL}), Edge TPU runtime {r.runtime}; read from the .tflite "
        f"itself ({r.reader}), without the compiler",
        f"- Parameters mapped to the Edge TPU: {format_bytes(r.param_bytes_tpu)} of {format_bytes(r.param_bytes_total)}"
        f"; on-chip memory {format_bytes(r.sram_bytes)}: {format_bytes(r.on_chip_bytes)} cached on chip, "
        f"{format_bytes(r.off_chip_bytes)} streamed from off-chip memory on every inference",
    ]
    if r.blockers:
        out += ["", "### Blockers (the compiler would refuse the whole model)", ""]
        out += [f"- {b.message}. What to change: {b.hint}" for b in r.blockers]
    fb = r.first_fallback
    if fb is not None:
        out += ["", "### First CPU fallback", ""]
        out.append(f"- Op #{fb.op_index} `{fb.op}` falls back to the CPU: {'; '.join(fb.reasons)}")
        out.append(f"- It and the {fb.ops_after} ops after it run on the CPU.")
        out += [f"- What to change: {h}" for h in fb.what_to_change]
        if r.also_failing:
            later = ", ".join(f"#{i} {r.ops[i].op}" for i in r.also_failing)
            out.append(f"- Fixing it is not enough: later ops break rules too ({later}).")
    out += [
        "",
        "| # | op | version | input dtypes | output dtypes | quantization | maps to TPU | reason |",
        "|---|----|---------|--------------|---------------|--------------|-------------|--------|",
    ]
    for o in r.ops:
        cells = [
            str(o.index),
            o.op,
            str(o.version),
            ", ".join(o.input_dtypes),
            ", ".join(o.output_dtypes),
            o.quantization,
            _PLACEMENT_TEXT[o.placement],
            o.reason,
        ]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if r.warnings:
        out += ["", "### Warnings", ""] + [f"- {w}" for w in r.warnings]
    out += ["", "### edgetpu_compiler", "", *_compiler_md(r)]
    return out


def _compiler_md(r: CompatReport) -> list[str]:
    c = r.compiler
    if c is None:
        return ["- Not run for this report."]
    if not c.available:
        return [f"- {c.message}"]
    lines = [f"- {c.message.splitlines()[0]}", f"- Exit code: {c.returncode}"]
    s = c.stats
    if s is not None and s.compiled:
        lines += [
            f"- Compiler version {s.version}; Edge TPU subgraphs: {s.edgetpu_subgraphs}; "
            f"ops on the Edge TPU: {s.ops_on_tpu}, on the CPU: {s.ops_on_cpu} (this analysis: {r.tpu_ops} / "
            f"{r.cpu_ops})",
            f"- On-chip memory for parameters: {format_bytes(s.on_chip_bytes)}; off-chip (streamed): "
            f"{format_bytes(s.off_chip_bytes)}",
        ]
    if c.edgetpu_model is not None:
        lines.append(f"- Edge TPU model: `{c.edgetpu_model}`")
    if c.ops:
        lines += ["", "| operator | count | status |", "|----------|-------|--------|"]
        lines += [f"| {row.op} | {row.count} | {_cell(row.status)} |" for row in c.ops]
    return lines
