"""Re-quantize the SavedModel onnx2tf converted from, with some ops kept in float (selective quantization).

Runs as a subprocess (`python -m pipeline.quantize.tfconv job.json`) so TensorFlow never loads into the
pipeline's process, like onnx2tf itself. The converter settings are onnx2tf 1.29's own (from_saved_model,
Optimize.DEFAULT, TFLITE_BUILTINS_INT8 + SELECT_TF_OPS, the same per-channel switch, calibration data
normalized with the model's mean/std); the quantization step is the one TensorFlow's QuantizationDebugger
uses to denylist nodes (calibrate only, then `mlir_quantize(..., denylisted_nodes=...)`), with the I/O types
of the profile's `quantize.int8_io`.

job.json: {"saved_model": dir, "calibration": calib.npy (NHWC 0-1 float32), "mean": [...], "std": [...],
"per_channel": bool, "int8_io": "int8"|"uint8"|"float32", "denylisted_nodes": [tensor names], "out": path,
"mode": "int8" (default) | "16x8", "ranges": null | "measured" | "mse" | "percentile:Q" (int8 mode: inner
activation ranges from the values measured, pipeline/quantize/ranges.py), "ranges_out": path (what changed)}

Mode "16x8": int16 activations and int8 weights (TensorFlow's
EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8, with float kernels allowed for ops that have no
16x8 kernel), float32 input and output; TFLite's built-in CPU kernels run it, XNNPACK does not accelerate it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _representative(job: dict[str, Any]) -> Any:
    import numpy as np

    calib = np.load(job["calibration"]).astype(np.float32)
    mean = np.asarray(job["mean"], np.float32).reshape(1, 1, 1, -1)
    std = np.asarray(job["std"], np.float32).reshape(1, 1, 1, -1)

    def representative():
        for i in range(len(calib)):
            yield [((calib[i : i + 1] - mean) / std).astype(np.float32)]

    return representative


def _write(out: Path, model: bytes) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model)
    tmp.replace(out)


def quantize_16x8(job: dict[str, Any]) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(job["saved_model"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]  # fmt: skip
    converter._experimental_disable_per_channel = not job["per_channel"]
    converter.representative_dataset = _representative(job)
    _write(Path(job["out"]), converter.convert())


def requantize(job: dict[str, Any]) -> None:
    import tensorflow as tf
    from tensorflow.lite.python import convert

    if job.get("mode", "int8") == "16x8":
        return quantize_16x8(job)
    representative = _representative(job)
    converter = tf.lite.TFLiteConverter.from_saved_model(job["saved_model"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.SELECT_TF_OPS]
    converter._experimental_disable_per_channel = not job["per_channel"]
    converter.representative_dataset = representative
    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True
    calibrated = converter.convert()
    if job.get("ranges"):
        calibrated = _set_ranges(calibrated, job)
    nodes = _exact_names(calibrated, job["denylisted_nodes"])
    io = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[job["int8_io"]]
    model = convert.mlir_quantize(
        calibrated,
        disable_per_channel=not job["per_channel"],
        fully_quantize=job["int8_io"] != "float32",
        input_data_type=io,
        output_data_type=io,
        denylisted_nodes=nodes or None,
    )
    _write(Path(job["out"]), model)
    return None


def _set_ranges(calibrated: bytes, job: dict[str, Any]) -> bytes:
    """The calibrated model with each inner activation's min/max replaced by the range job["ranges"] picks
    ("measured", "mse" or "percentile:Q", pipeline/quantize/ranges.py) from its values on the calibration
    images; the model's input and output keep theirs. Writes what changed to job["ranges_out"].

    The values are read from the calibrated model itself, every tensor kept: a first pass finds each tensor's
    true min/max, a second (not for "measured") counts its values into a histogram over that. Not over the
    min/max the calibrator recorded: measured on the bench model with a constant MUL after a conv, TFLite's
    calibrator gave the conv's output the MUL's range (30x wider than the values it takes; the MUL runs in
    place, so its input buffer holds its output when the calibrator reads it), and a histogram over that would
    have put all of the tensor's values in a few bins."""
    from tensorflow.lite.tools import flatbuffer_utils

    from pipeline.quantize.ranges import Histogram, range_picker
    from pipeline.targets import RANGE_METHODS

    method = str(job["ranges"])
    if (pick := range_picker(method)) is None:
        raise SystemExit(f"tfconv: ranges {method!r} is not a range method; valid: {RANGE_METHODS}")

    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    graph = model.subgraphs[0]
    ends = {int(i) for i in (*graph.inputs, *graph.outputs)}
    chosen = {
        i: t
        for i, t in enumerate(graph.tensors)
        if i not in ends and t.quantization is not None and t.quantization.min is not None
        and len(t.quantization.min) == 1
    }  # fmt: skip
    recorded = {i: (float(t.quantization.min[0]), float(t.quantization.max[0])) for i, t in chosen.items()}
    seen = _fill(calibrated, job, {i: Histogram.over(lo, hi, bins=1) for i, (lo, hi) in recorded.items()})
    hists = seen
    if method != "measured":
        over = {i: (h.seen_lo, h.seen_hi) if h.seen_lo <= h.seen_hi else recorded[i] for i, h in seen.items()}
        hists = _fill(calibrated, job, {i: Histogram.over(lo, hi) for i, (lo, hi) in over.items()})
    changed = []
    for i, t in chosen.items():
        lo, hi = pick(hists[i])
        was = recorded[i]
        if not (math.isclose(lo, was[0], rel_tol=1e-5, abs_tol=1e-9) and math.isclose(hi, was[1], rel_tol=1e-5)):
            t.quantization.min, t.quantization.max = [lo], [hi]
            name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
            changed.append({"tensor": name, "was": was, "seen": (seen[i].seen_lo, seen[i].seen_hi), "now": (lo, hi)})
    if job.get("ranges_out"):
        Path(job["ranges_out"]).write_text(json.dumps({"method": method, "tensors": len(chosen), "changed": changed}))
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _fill(calibrated: bytes, job: dict[str, Any], hists: dict[int, Any]) -> dict[int, Any]:
    """`hists` (tensor index -> Histogram) filled with each tensor's values on the calibration images."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    for batch in _representative(job)():
        interp.set_tensor(inp, batch[0])
        interp.invoke()
        for i, h in hists.items():
            h.add(interp.get_tensor(i))
    return hists


def _exact_names(calibrated: bytes, wanted: list[str]) -> list[str]:
    """The calibrated model's own names of the `wanted` tensors (matched without their fused constants)."""
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.quantize.operrors import norm_name

    names = [d["name"] for d in Interpreter(model_content=calibrated).get_tensor_details()]
    by_norm = {norm_name(n): n for n in names}
    missing = [w for w in wanted if norm_name(w) not in by_norm]
    if missing:
        raise SystemExit(f"tfconv: tensors not in the calibrated model: {missing}")
    return [by_norm[norm_name(w)] for w in wanted]


if __name__ == "__main__":
    requantize(json.loads(Path(sys.argv[1]).read_text()))
