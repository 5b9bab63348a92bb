"""Run Coral's `edgetpu_compiler` when it is on PATH, and parse what it prints.

The compiler is a closed-source x86-64 Linux binary from Coral's apt repository (package `edgetpu-compiler`);
nothing on PyPI or in Debian provides it. When it is not on PATH, `run_compiler` returns a record with
`available=False` and a message that says so; it never pretends a model was compiled.

Its output format (edgetpu_compiler 16.0.384591198, the last release, run with `-s`), as printed in real
reports such as google-coral/edgetpu#659, #720, #433 and WongKinYiu/yolov7#1672:

    Edge TPU Compiler version 16.0.384591198
    Started a compilation timeout timer of 180 seconds.

    Model compiled successfully in 354 ms.

    Input model: bitintmodel.tflite
    Input size: 40.59KiB
    Output model: bitintmodel_edgetpu.tflite
    Output size: 1.41MiB
    On-chip memory used for caching model parameters: 932.50KiB
    On-chip memory remaining for caching model parameters: 6.71MiB
    Off-chip memory used for streaming uncached model parameters: 0.00B
    Number of Edge TPU subgraphs: 1
    Total number of operations: 32
    Operation log: bitintmodel_edgetpu.log

    Model successfully compiled but not all operations are supported by the Edge TPU. ...
    Number of operations that will run on Edge TPU: 30
    Number of operations that will run on CPU: 2

    Operator                       Count      Status

    CONV_2D                        3          Mapped to Edge TPU
    GATHER_ND                      1          Operation not supported
    ...
    Compilation child process completed within timeout period.
    Compilation succeeded!

Failures print `ERROR: ...` lines ("Didn't find op for builtin opcode 'CONV_2D' version '6'", "Compilation
failed due to large activation tensors in model.") and end with "Compilation failed!" or "Model could not be
parsed", with a non-zero exit code. The same per-op table is written to `<model>_edgetpu.log` in the output
directory; it is read from there when stdout has none.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConversionError
from pipeline.proc import run_tool

log = logging.getLogger(__name__)

COMPILER = "edgetpu_compiler"
MAPPED = "Mapped to Edge TPU"
TAIL_LINES = 30
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KiB|MiB|GiB)\s*$")
_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\S.*?)\s*$")
_HEADER = re.compile(r"^Operator\s+Count\s+Status\s*$")
_ERROR = re.compile(
    r"^(ERROR:.*|Compilation failed.*|Invalid model.*|Model could not be parsed.*|Internal compiler error.*)$"
)
_FIELDS = {
    "version": r"Edge TPU Compiler version (\S+)",
    "compile_ms": r"Model compiled successfully in (\d+) ms",
    "input_model": r"^Input model: (.+?)\s*$",
    "input_size": r"^Input size: (.+?)\s*$",
    "output_model": r"^Output model: (.+?)\s*$",
    "output_size": r"^Output size: (.+?)\s*$",
    "on_chip": r"^On-chip memory used for caching model parameters: (.+?)\s*$",
    "on_chip_remaining": r"^On-chip memory remaining for caching model parameters: (.+?)\s*$",
    "off_chip": r"^Off-chip memory used for streaming uncached model parameters: (.+?)\s*$",
    "subgraphs": r"^Number of Edge TPU subgraphs: (\d+)",
    "total_ops": r"^Total number of operations: (\d+)",
    "operation_log": r"^Operation log: (.+?)\s*$",
    "ops_tpu": r"^Number of operations that will run on Edge TPU: (\d+)",
    "ops_cpu": r"^Number of operations that will run on CPU: (\d+)",
}


@dataclass(frozen=True)
class OpStatusRow:
    """One line of the compiler's "Operator / Count / Status" table."""

    op: str
    count: int
    status: str  # "Mapped to Edge TPU", "Operation not supported", "More than one subgraph is not supported", ...

    @property
    def mapped(self) -> bool:
        return self.status == MAPPED


@dataclass(frozen=True)
class CompilerStats:
    """What one compiler log says. Sizes are bytes (the log's KiB/MiB converted); None when not printed."""

    version: str | None
    compiled: bool  # "Model compiled successfully"
    compile_ms: int | None
    input_model: str | None
    output_model: str | None
    input_size_bytes: int | None
    output_size_bytes: int | None
    on_chip_bytes: int | None
    on_chip_remaining_bytes: int | None
    off_chip_bytes: int | None
    edgetpu_subgraphs: int | None
    total_ops: int | None
    ops_on_tpu: int | None
    ops_on_cpu: int | None
    operation_log: str | None
    rows: tuple[OpStatusRow, ...]
    errors: tuple[str, ...]

    @property
    def mapped_rows(self) -> tuple[OpStatusRow, ...]:
        return tuple(r for r in self.rows if r.mapped)

    @property
    def not_mapped_rows(self) -> tuple[OpStatusRow, ...]:
        return tuple(r for r in self.rows if not r.mapped)


@dataclass(frozen=True)
class CompilerResult:
    """One attempt to run edgetpu_compiler. `available=False`: it is not installed and nothing was run."""

    available: bool
    message: str
    argv: tuple[str, ...]
    returncode: int | None  # None: not run, or killed at the timeout
    log: str  # stdout + stderr (and the operation log file when stdout had no table)
    stats: CompilerStats | None
    edgetpu_model: Path | None  # the *_edgetpu.tflite written, when it exists
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.available and self.returncode == 0 and self.edgetpu_model is not None

    @property
    def ops(self) -> tuple[OpStatusRow, ...]:
        return self.stats.rows if self.stats else ()

    @property
    def not_mapped(self) -> tuple[OpStatusRow, ...]:
        return self.stats.not_mapped_rows if self.stats else ()

    @property
    def on_chip_bytes(self) -> int | None:
        return self.stats.on_chip_bytes if self.stats else None

    @property
    def off_chip_bytes(self) -> int | None:
        return self.stats.off_chip_bytes if self.stats else None

    @property
    def subgraphs(self) -> int | None:
        return self.stats.edgetpu_subgraphs if self.stats else None

    def raise_for_status(self) -> CompilerResult:
        """Return self when a *_edgetpu.tflite was produced; else raise ConversionError with the message."""
        if not self.ok:
            raise ConversionError(self.message)
        return self

    def to_dict(self) -> dict[str, object]:
        stats = self.stats
        return {
            "available": self.available,
            "message": self.message,
            "argv": list(self.argv),
            "returncode": self.returncode,
            "seconds": round(self.seconds, 3),
            "edgetpu_model": None if self.edgetpu_model is None else str(self.edgetpu_model),
            "version": stats.version if stats else None,
            "on_chip_bytes": self.on_chip_bytes,
            "off_chip_bytes": self.off_chip_bytes,
            "edgetpu_subgraphs": self.subgraphs,
            "ops_on_tpu": stats.ops_on_tpu if stats else None,
            "ops_on_cpu": stats.ops_on_cpu if stats else None,
            "ops": [{"op": r.op, "count": r.count, "status": r.status} for r in self.ops],
            "errors": list(stats.errors) if stats else [],
        }


def parse_size(text: str) -> int | None:
    """'6.86MiB' -> bytes; None when it is not a size in the compiler's units."""
    m = _SIZE.match(text)
    return None if m is None else round(float(m.group(1)) * _UNITS[m.group(2)])


def _rows(lines: list[str]) -> list[OpStatusRow]:
    rows: list[OpStatusRow] = []
    in_table = False
    for line in lines:
        if _HEADER.match(line.strip()):
            in_table, rows = True, []  # the last table wins (-d segment search prints several)
            continue
        if not in_table:
            continue
        m = _ROW.match(line.strip())
        if m is not None:
            rows.append(OpStatusRow(m.group(1), int(m.group(2)), m.group(3)))
        elif line.strip() and rows:
            in_table = False  # first non-row line after the rows ends the table
    return rows


def parse_compiler_log(text: str) -> CompilerStats:
    """Parse edgetpu_compiler's stdout (or its <model>_edgetpu.log); fields it does not print stay None."""
    lines = text.splitlines()
    found: dict[str, str] = {}
    for key, pattern in _FIELDS.items():
        matches = re.findall(pattern, text, flags=re.MULTILINE)
        if matches:
            found[key] = matches[-1]  # segment search prints one block per try: keep the last

    def num(key: str) -> int | None:
        return int(found[key]) if key in found else None

    def size(key: str) -> int | None:
        return parse_size(found[key]) if key in found else None

    rows = _rows(lines)
    compiled = "compile_ms" in found
    ops_tpu, ops_cpu = num("ops_tpu"), num("ops_cpu")
    if ops_tpu is None and compiled and rows:  # a fully mapped model prints no counts: take them from the table
        ops_tpu = sum(r.count for r in rows if r.mapped)
        ops_cpu = sum(r.count for r in rows if not r.mapped)
    return CompilerStats(
        version=found.get("version"),
        compiled=compiled,
        compile_ms=num("compile_ms"),
        input_model=found.get("input_model"),
        output_model=found.get("output_model"),
        input_size_bytes=size("input_size"),
        output_size_bytes=size("output_size"),
        on_chip_bytes=size("on_chip"),
        on_chip_remaining_bytes=size("on_chip_remaining"),
        off_chip_bytes=size("off_chip"),
        edgetpu_subgraphs=num("subgraphs"),
        total_ops=num("total_ops"),
        ops_on_tpu=ops_tpu,
        ops_on_cpu=ops_cpu,
        operation_log=found.get("operation_log"),
        rows=tuple(rows),
        errors=tuple(line.strip() for line in lines if _ERROR.match(line.strip())),
    )


def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def _run(argv: list[str], *, timeout_s: float) -> tuple[int | None, str, float]:
    """Run argv (its own session, killed with edgeship); (exit code or None on timeout, output, seconds)."""
    try:
        done = run_tool(argv, timeout_s=timeout_s, merge_stderr=True)
    except OSError as exc:
        raise ConversionError(f"cannot start {argv[0]} ({exc}); argv: {' '.join(argv)}") from exc
    return done.rc, done.stdout + done.stderr, done.seconds


def not_available(model: Path) -> CompilerResult:
    msg = (
        f"{COMPILER} is not on PATH, so it was not run: no {Path(model).stem}_edgetpu.tflite was produced and "
        "nothing was compiled for the Edge TPU. The compatibility table comes from reading the .tflite only. "
        "To compile, install Coral's `edgetpu-compiler` package (x86-64 Debian/Ubuntu, from Coral's apt "
        "repository) and run again."
    )
    return CompilerResult(False, msg, (), None, "", None, None)


def run_compiler(
    model: Path, out_dir: Path, *, timeout_s: float = 300, min_runtime: int | None = None
) -> CompilerResult:
    """Compile `model` into `out_dir` with edgetpu_compiler when it is on PATH.

    Returns a CompilerResult in every case but a missing model (ConversionError): `available=False` when the
    compiler is not installed; otherwise its exit code, parsed log and the *_edgetpu.tflite path (None when it
    failed, timed out or wrote nothing). Call `.raise_for_status()` to turn a failure into ConversionError.
    """
    model, out_dir = Path(model), Path(out_dir)
    if not model.is_file():
        raise ConversionError(f"{model}: TFLite model not found; run the convert stage first")
    exe = shutil.which(COMPILER)
    if exe is None:
        result = not_available(model)
        log.info("%s", result.message)
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [exe, "-s", "-o", str(out_dir)]
    if min_runtime is not None:
        argv += ["-m", str(min_runtime)]
    argv.append(str(model))
    log.info("%s: %s", model.name, " ".join(argv))
    rc, text, seconds = _run(argv, timeout_s=timeout_s)
    stats = parse_compiler_log(text)
    op_log = out_dir / f"{model.stem}_edgetpu.log"
    if not stats.rows and op_log.is_file():
        text = text.rstrip() + f"\n--- {op_log.name} ---\n" + op_log.read_text(errors="replace")
        stats = parse_compiler_log(text)
    produced = out_dir / f"{model.stem}_edgetpu.tflite"
    edgetpu_model = produced if produced.is_file() else None
    cmd = " ".join(argv)
    if rc is None:
        edgetpu_model = None
        msg = f"{COMPILER} timed out after {timeout_s:g} s on {model}; raise timeout_s.\nargv: {cmd}"
    elif rc != 0:
        edgetpu_model = None
        why = "; ".join(stats.errors) or "no error line printed"
        msg = (
            f"{COMPILER} failed with exit code {rc} on {model}: {why}\nargv: {cmd}\n"
            f"--- last lines of {COMPILER} output ---\n{_tail(text)}"
        )
    elif edgetpu_model is None:
        msg = f"{COMPILER} exited 0 but did not write {produced}.\nargv: {cmd}\n--- last lines ---\n{_tail(text)}"
    else:
        tpu, cpu = stats.ops_on_tpu, stats.ops_on_cpu
        msg = f"{COMPILER} {stats.version or '?'} wrote {produced.name} in {seconds:.1f} s"
        if tpu is not None:
            msg += f": {tpu} ops on the Edge TPU, {cpu or 0} on the CPU"
    log.info("%s", msg.splitlines()[0])
    return CompilerResult(True, msg, tuple(argv), rc, text, stats, edgetpu_model, seconds)
