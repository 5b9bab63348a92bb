"""The `metadata.json` an app reads: everything needed to feed the model and read its answer, nothing else.

Built from the bundle's metadata (normalization, class names), the model's own tensors (shape, dtype,
quantization, as the interpreter reports them) and the bundle manifest's figures (accuracy on the test set).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline import __version__
from pipeline.errors import ShipError

FORMAT = "edgeship-metadata/2"
SCHEMA_VERSION = 2
FORMULA = (
    "x = (pixel / 255 - mean[c]) / std[c] per channel c (NHWC); an integer input takes q = round(x / scale) + "
    "zero_point, clipped to the dtype; an integer output is dequantized as (q - zero_point) * scale; the class is "
    "the index of the largest output, its name line i of labels.txt"
)


def _bundle_quant(q: Any) -> dict[str, float | int] | None:
    """{"scale", "zero_point"} from a mapping or a (scale, zero_point) pair; None for float tensors."""
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


def bundle_metadata(
    summary: Mapping[str, Any],
    io: Mapping[str, Any],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str],
    version: str,
) -> dict[str, Any]:
    """The bundle's `metadata.json`: the one schema (FORMAT) an app reads, in the bundle and in the app.

    `io` has the shipped model's "input" and "output" as {"shape", "dtype", "quantization"}; quantization is
    {"scale", "zero_point"} for integer tensors, None for float ones."""
    precision = summary["shipped_precision"]
    variant = summary.get("variants", {}).get(precision, {})
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": summary["model"],
        "target": summary["target"],
        "precision": precision,
        "version": version,
        "layout": "NHWC",
        "input": _tensor(io["input"]),
        "output": _tensor(io["output"]),
        "normalization": _normalization(mean, std),
        "class_names": list(class_names),
        "labels_file": "labels.txt",
        "accuracy": {
            "value": variant.get("accuracy"),
            "test_images": summary.get("test_images"),
            "test_set": (summary.get("data") or {}).get("test"),
        },
        "edgeship_version": __version__,
    }


def _normalization(mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    return {"mean": mean, "std": std, "pixel_scale": 1 / 255, "formula": FORMULA}


def _tensor(t: Mapping[str, Any]) -> dict[str, Any]:
    return {"shape": list(t["shape"]), "dtype": t["dtype"], "quantization": _bundle_quant(t.get("quantization"))}


def app_metadata(
    bundle_meta: Mapping[str, Any], io: Mapping[str, Any], *, version: str, bundle_sha256: str
) -> dict[str, Any]:
    """The app's copy of the bundle's metadata (same schema, its own `version` and the bundle model's sha256;
    `sha256` of the final model file is added by the caller). Refuses a bundle that disagrees with its model."""
    if bundle_meta.get("format") != FORMAT:
        raise ShipError(
            f"the bundle's metadata.json has format {bundle_meta.get('format')!r}, not {FORMAT}: it was made by an "
            "older edgeship; deploy again to rebuild the bundle"
        )
    _check_agrees(bundle_meta, io)
    classes = list(bundle_meta["class_names"])
    if io["output"]["shape"][-1] != len(classes):
        raise ShipError(
            f"the model has {io['output']['shape'][-1]} outputs but the bundle names {len(classes)} classes"
        )
    channels = io["input"]["shape"][-1]
    norm = bundle_meta["normalization"]
    if len(norm["mean"]) not in (1, channels) or len(norm["std"]) != len(norm["mean"]):
        raise ShipError(
            f"normalization has {len(norm['mean'])} means and {len(norm['std'])} stds for {channels} channels"
        )
    return {**bundle_meta, "version": version, "bundle_sha256": bundle_sha256,
            "input": dict(io["input"]), "output": dict(io["output"])}  # fmt: skip
