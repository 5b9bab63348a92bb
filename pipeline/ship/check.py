"""What the TFLite interpreter itself says about a model: its I/O, and that two files compute the same thing."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import ShipError


def _interpreter(model: bytes) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=model, num_threads=1)
    interp.allocate_tensors()
    return interp


def _quant(detail: dict[str, Any]) -> dict[str, float | int] | None:
    scale, zero_point = detail["quantization"]
    return None if not scale else {"scale": float(scale), "zero_point": int(zero_point)}


def io_details(model: bytes) -> dict[str, Any]:
    """Shape, dtype and quantization (scale, zero point or None) of the model's one input and one output."""
    interp = _interpreter(model)
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if len(ins) != 1 or len(outs) != 1:
        raise ShipError(f"the model has {len(ins)} inputs and {len(outs)} outputs; an app bundle needs one of each")

    def one(d: dict[str, Any]) -> dict[str, Any]:
        return {"shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name, "quantization": _quant(d)}

    return {"input": one(ins[0]), "output": one(outs[0])}


def _random_input(detail: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    shape = tuple(int(x) for x in detail["shape"])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def check_same_outputs(original: bytes, changed: bytes, *, trials: int = 4, seed: int = 0) -> None:
    """Raise ShipError unless `changed` loads and gives bit-identical outputs to `original` on random inputs."""
    try:
        a, b = _interpreter(original), _interpreter(changed)
    except (RuntimeError, ValueError) as exc:
        raise ShipError(f"the model with embedded metadata does not load in the TFLite interpreter: {exc}") from None
    rng = np.random.default_rng(seed)
    ia, oa = a.get_input_details()[0], a.get_output_details()[0]
    ib, ob = b.get_input_details()[0], b.get_output_details()[0]
    for _ in range(trials):
        x = _random_input(ia, rng)
        a.set_tensor(ia["index"], x)
        b.set_tensor(ib["index"], x)
        a.invoke()
        b.invoke()
        ya, yb = a.get_tensor(oa["index"]), b.get_tensor(ob["index"])
        if ya.shape != yb.shape or not np.array_equal(ya, yb):
            raise ShipError("embedding metadata changed the model's outputs; ship without embedding (embed=False)")
