"""A small wrapper over the LiteRT interpreter (`ai_edge_litert.interpreter.Interpreter`).

Only single-input, single-output image classifiers are handled: input (1, H, W, C) NHWC, output (1, classes).
Quantized (int8/uint8/int16) inputs are quantized with the model's own scale and zero point, quantized
outputs are dequantized, so callers always pass normalized float images and get float logits back.

`ai_edge_litert` is imported only inside the functions (it does not pull in TensorFlow, but the rest of the
package must import without it). Every failure is a `VerificationError` naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import VerificationError

if TYPE_CHECKING:
    from ai_edge_litert.interpreter import Interpreter

log = logging.getLogger(__name__)

_QUANTIZED = (np.int8, np.uint8, np.int16)


def load_interpreter(path: Path, *, threads: int) -> Interpreter:
    """Load a .tflite file with `threads` CPU threads (XNNPACK on, as by default) and allocate its tensors."""
    path = Path(path)
    if not path.is_file():
        raise VerificationError(f"{path}: TFLite model not found")
    if threads < 1:
        raise VerificationError(f"{path}: threads must be >= 1, got {threads}")
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:  # pragma: no cover - the package pins ai-edge-litert
        raise VerificationError(f"{path}: ai-edge-litert is not installed ({exc}); pip install ai-edge-litert") from exc
    try:
        interp = Interpreter(model_path=str(path), num_threads=threads)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise VerificationError(f"{path}: not a loadable TFLite model: {exc}") from exc
    interp._edgeship_path = str(path)  # type: ignore[attr-defined]  # names the file in later errors
    return interp


def _source(interp: Interpreter) -> str:
    return getattr(interp, "_edgeship_path", "<tflite interpreter>")


def _single_io(interp: Interpreter) -> tuple[dict[str, Any], dict[str, Any]]:
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise VerificationError(
            f"{_source(interp)}: expected 1 input and 1 output, got {len(inputs)} inputs and {len(outputs)} outputs"
        )
    return inputs[0], outputs[0]


def _quant(detail: dict[str, Any]) -> tuple[float, int] | None:
    scale, zero_point = detail["quantization"]
    if detail["dtype"] not in _QUANTIZED or scale == 0.0:
        return None
    return float(scale), int(zero_point)


def run_batch(
    path_or_interp: Path | str | Interpreter,
    images: np.ndarray,
    *,
    threads: int = 2,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Run normalized float NHWC images (N, H, W, C) one at a time; return float32 logits (N, classes).

    `threads` is used only when a path is given. `progress`, if given, is called with 1 after each image
    (e.g. a tqdm bar's `update`).
    """
    if isinstance(path_or_interp, (str, Path)):
        interp = load_interpreter(Path(path_or_interp), threads=threads)
    else:
        interp = path_or_interp
    src = _source(interp)
    inp, out = _single_io(interp)
    want = tuple(int(d) for d in inp["shape"])
    if images.ndim != 4 or tuple(images.shape[1:]) != want[1:] or want[0] != 1:
        raise VerificationError(
            f"{src}: model input is {want} (NHWC, batch 1), got images {images.shape}; "
            "pass normalized NHWC images of the model's size"
        )
    in_q, out_q = _quant(inp), _quant(out)
    in_dtype = inp["dtype"]
    if in_q is None and in_dtype in _QUANTIZED:
        raise VerificationError(f"{src}: {np.dtype(in_dtype).name} input without quantization parameters")
    results: list[np.ndarray] = []
    try:
        for i in range(len(images)):
            x = images[i : i + 1].astype(np.float32, copy=False)
            if in_q is not None:
                info = np.iinfo(in_dtype)
                x = np.clip(np.round(x / in_q[0] + in_q[1]), info.min, info.max)
            interp.set_tensor(inp["index"], x.astype(in_dtype))
            interp.invoke()
            y = interp.get_tensor(out["index"])
            if out_q is not None:
                y = (y.astype(np.float32) - out_q[1]) * out_q[0]
            results.append(y.reshape(1, -1).astype(np.float32))
            if progress is not None:
                progress(1)
    except (ValueError, RuntimeError) as exc:
        raise VerificationError(f"{src}: inference failed on image {len(results)}: {exc}") from exc
    if not results:
        return np.zeros((0, int(np.prod(out["shape"][1:]))), dtype=np.float32)
    return np.concatenate(results, axis=0)


def uses_xnnpack(interp: Interpreter) -> bool:
    """True when at least one node was delegated (XNNPACK is the only delegate the host interpreter applies)."""
    try:
        ops = interp._get_ops_details()
    except (AttributeError, ValueError, RuntimeError) as exc:
        raise VerificationError(f"{_source(interp)}: cannot list the interpreter's ops: {exc}") from exc
    return sum(1 for op in ops if op.get("op_name") == "DELEGATE") > 0


def _io_record(detail: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": str(detail["name"]),
        "shape": [int(d) for d in detail["shape"]],
        "dtype": np.dtype(detail["dtype"]).name,
        "quantization": _quant(detail),
    }


def tflite_io_details(path: Path, *, threads: int = 1) -> dict[str, Any]:
    """Inputs, outputs (name, shape, dtype, (scale, zero_point) or None), op counts and signatures of a file.

    Plain JSON-friendly values: {"path", "size_bytes", "inputs": [...], "outputs": [...], "ops": {name: n},
    "xnnpack": bool, "signatures": {...}}.
    """
    path = Path(path)
    interp = load_interpreter(path, threads=threads)
    ops: dict[str, int] = {}
    for op in interp._get_ops_details():
        name = str(op.get("op_name"))
        ops[name] = ops.get(name, 0) + 1
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "inputs": [_io_record(d) for d in interp.get_input_details()],
        "outputs": [_io_record(d) for d in interp.get_output_details()],
        "ops": ops,
        "xnnpack": ops.get("DELEGATE", 0) > 0,
        "signatures": interp.get_signature_list(),
    }
