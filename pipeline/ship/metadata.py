"""The `metadata.json` an app reads: everything needed to feed the model and read its answer, nothing else.

Built from the bundle's metadata (normalization, class names), the model's own tensors (shape, dtype,
quantization, as the interpreter reports them) and the bundle manifest's figures (accuracy on the test set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline import __version__
from pipeline.errors import ShipError

FORMAT = "edgeship-app-metadata/1"
FORMULA = (
    "x = (pixel / 255 - mean[c]) / std[c] per channel c (NHWC); an integer input takes q = round(x / scale) + "
    "zero_point, clipped to the dtype; an integer output is dequantized as (q - zero_point) * scale; the class is "
    "the index of the largest output, its name line i of labels.txt"
)


def _bundle_quant(q: Any) -> dict[str, float | int] | None:
    """The bundle writes (scale, zero_point) as a list, None or a zero scale for float tensors."""
    if q is None:
        return None
    if isinstance(q, Mapping):
        scale, zp = q.get("scale"), q.get("zero_point")
    else:
        scale, zp = q
    return None if not scale else {"scale": float(scale), "zero_point": int(zp)}


def _same_quant(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a["scale"], b["scale"], rel_tol=1e-6) and a["zero_point"] == b["zero_point"]


def _check_agrees(bundle_meta: Mapping[str, Any], io: Mapping[str, Any]) -> None:
    """The bundle's description of the tensors must be the model's; a mismatch means a broken bundle."""
    for side in ("input", "output"):
        b, m = bundle_meta.get(side, {}), io[side]
        bq = _bundle_quant(b.get("quantization"))
        if (
            list(b.get("shape", [])) != m["shape"]
            or b.get("dtype") != m["dtype"]
            or not _same_quant(bq, m["quantization"])
        ):
            raise ShipError(
                f"the bundle's metadata.json describes the {side} as {b.get('shape')} {b.get('dtype')} {bq}, "
                f"but model.tflite has {m['shape']} {m['dtype']} {m['quantization']}; deploy again to rebuild it"
            )


def app_metadata(
    bundle_meta: Mapping[str, Any],
    summary: Mapping[str, Any],
    io: Mapping[str, Any],
    *,
    version: str,
    bundle_sha256: str,
) -> dict[str, Any]:
    """The app-side metadata (without `sha256`, which names the final model file and is added by the caller)."""
    _check_agrees(bundle_meta, io)
    classes = list(bundle_meta["class_names"])
    if io["output"]["shape"][-1] != len(classes):
        raise ShipError(
            f"the model has {io['output']['shape'][-1]} outputs but the bundle names {len(classes)} classes"
        )
    channels = io["input"]["shape"][-1]
    mean, std = [float(v) for v in bundle_meta["mean"]], [float(v) for v in bundle_meta["std"]]
    if len(mean) not in (1, channels) or len(std) != len(mean):
        raise ShipError(f"normalization has {len(mean)} means and {len(std)} stds for {channels} channels")
    precision = bundle_meta.get("precision") or summary.get("shipped_precision")
    variant = summary.get("variants", {}).get(precision, {})
    return {
        "format": FORMAT,
        "model": bundle_meta.get("model") or summary.get("model"),
        "target": bundle_meta.get("target") or summary.get("target"),
        "precision": precision,
        "version": version,
        "bundle_sha256": bundle_sha256,
        "layout": bundle_meta.get("layout", "NHWC"),
        "input": dict(io["input"]),
        "output": dict(io["output"]),
        "normalization": {"mean": mean, "std": std, "pixel_scale": 1 / 255, "formula": FORMULA},
        "class_names": classes,
        "labels_file": "labels.txt",
        "accuracy": {
            "value": variant.get("accuracy"),
            "test_images": summary.get("test_images"),
            "test_set": (summary.get("data") or {}).get("test"),
        },
        "edgeship_version": __version__,
    }
