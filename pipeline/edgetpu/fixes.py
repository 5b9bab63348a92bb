"""Conversion options that keep a model on the Edge TPU without changing the PyTorch model.

onnx2tf can rewrite some ONNX ops into "pseudo operators" made of ops the TPU maps (`-rtpo`, see
`onnx2tf -h`). Measured here with onnx2tf 1.29 on an int8 CNN (uint8 I/O), analysed by pipeline.edgetpu:

- LeakyRelu: LEAKY_RELU (not on the Edge TPU: everything after it falls back to the CPU) becomes
  RELU + MUL + MINIMUM + ADD: fully mapped.
- HardSwish: HARD_SWISH (not on the TPU) becomes ADD + MUL + MUL: fully mapped.
- Not rewritten: GELU. `-rtpo GeLU Erf` emits DEQUANTIZE/DIV/EXP in float, which compiler 16 refuses
  outright; the report tells the user to replace nn.GELU instead.

The numbers of the rewritten model are checked like any conversion (verify stage: accuracy, agreement with
PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# ONNX op type -> (onnx2tf -rtpo name, what happens)
PSEUDO_OPS: dict[str, tuple[str, str]] = {
    "LeakyRelu": ("LeakyReLU", "LeakyReLU rewritten as RELU/MUL/MINIMUM/ADD, which the Edge TPU maps"),
    "HardSwish": ("HardSwish", "Hardswish rewritten as ADD/MUL/MUL, which the Edge TPU maps"),
}


@dataclass(frozen=True)
class ConversionFixes:
    args: tuple[str, ...]  # extra onnx2tf arguments
    notes: tuple[str, ...]  # one line per fix, for the report

    def to_dict(self) -> dict[str, list[str]]:
        return {"onnx2tf_args": list(self.args), "notes": list(self.notes)}


def edgetpu_fixes(onnx_path: Path) -> ConversionFixes:
    """The onnx2tf options that avoid ops the Edge TPU lacks, for the ops present in `onnx_path`."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    present = {node.op_type for node in model.graph.node}
    found = [(t, *PSEUDO_OPS[t]) for t in sorted(present) if t in PSEUDO_OPS]
    if not found:
        return ConversionFixes((), ())
    args = ("-rtpo", *(rtpo for _, rtpo, _ in found))
    notes = tuple(f"{onnx_type}: {note} (onnx2tf -rtpo {rtpo})" for onnx_type, rtpo, note in found)
    return ConversionFixes(args, notes)
