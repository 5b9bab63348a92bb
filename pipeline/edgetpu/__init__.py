"""Coral Edge TPU: compatibility analysis of a .tflite file, and the `edgetpu_compiler` when it is installed.

- `tflite_model.read_tflite` reads the flatbuffer itself (no TensorFlow, no interpreter): operators with op
  name and version, tensors with dtype, shape, shape signature, quantization and constant-buffer sizes.
- `rules` holds the Edge TPU's published requirements and its supported-operation table.
- `analyze.analyze` checks every op against them, finds the first op that falls back to the CPU, estimates
  on-chip / off-chip parameter memory and renders the report (dict or Markdown).
- `compiler.run_compiler` runs `edgetpu_compiler` when it is on PATH and parses its log; when it is not,
  the result says so plainly.
"""

from __future__ import annotations

from pipeline.edgetpu.analyze import CompatReport, Fallback, Issue, OpReport, analyze
from pipeline.edgetpu.compiler import CompilerResult, CompilerStats, OpStatusRow, parse_compiler_log, run_compiler
from pipeline.edgetpu.tflite_model import (
    OperatorInfo,
    Quantization,
    SubgraphInfo,
    TensorInfo,
    TfliteModelInfo,
    read_tflite,
)

__all__ = [
    "CompatReport",
    "CompilerResult",
    "CompilerStats",
    "Fallback",
    "Issue",
    "OpReport",
    "OpStatusRow",
    "OperatorInfo",
    "Quantization",
    "SubgraphInfo",
    "TensorInfo",
    "TfliteModelInfo",
    "analyze",
    "parse_compiler_log",
    "read_tflite",
    "run_compiler",
]
