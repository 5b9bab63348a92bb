"""Export a PyTorch classifier to ONNX (fixed batch-1 input `input`, output `logits`) and check it.

Exporter choice (measured here on torch 2.13 CPU, a 4-conv residual CNN at 1x28x28, opset 18):

- TorchScript exporter (`dynamo=False`): 0.03-0.05 s, max |diff| vs torch 6e-8, emits
  Conv/Relu/Add/GlobalAveragePool/Flatten/Gemm (plus Identity nodes that onnxsim removes).
- `dynamo=True, external_data=False`: 0.7 s warm, 3.2 s on the first call of a process, max |diff| 1.5e-8,
  emits ReduceMean + Reshape for the pooling; prints progress to stdout unless `verbose=False`.

Both convert to identical TFLite numbers, so "auto" (the default) uses the TorchScript exporter first (faster,
traces any CNN whose forward is plain tensor code) with its deprecation warning silenced, and falls back to
dynamo when it raises. The exporter used is recorded in `OnnxExport.exporter`.

The graph is written to a temporary name beside `out`, checked (onnx.checker, names, static shape,
onnxruntime vs torch on seeded random input plus real images) and only then renamed to `out`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.errors import ExportError
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

Exporter = Literal["auto", "torchscript", "dynamo"]


@dataclass(frozen=True)
class OnnxExport:
    """An exported, checked ONNX file."""

    path: Path
    input_name: str
    output_name: str
    input_shape: tuple[int, int, int, int]  # (1, C, H, W)
    opset: int
    max_abs_diff: float  # max |onnxruntime - torch| over the check inputs (nan when unknown)
    exporter: str  # "torchscript" | "dynamo" ("unknown" for a record rebuilt by from_path)

    @classmethod
    def from_path(cls, path: Path, *, max_abs_diff: float = float("nan"), exporter: str = "unknown") -> OnnxExport:
        """Rebuild the record of an ONNX file written earlier (single 4-D static input, single output).

        Raises ExportError when the file is missing, unreadable or not a single-input/output static graph.
        """
        import onnx

        path = Path(path)
        if not path.is_file():
            raise ExportError(f"{path}: ONNX file not found; run the export stage again")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError and friends
            raise ExportError(f"{path}: not a readable ONNX file: {_describe(exc)}") from exc
        graph = model.graph
        inits = {init.name for init in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ExportError(f"{path}: expected one input and one output, got {len(inputs)} and {len(graph.output)}")
        dims = inputs[0].type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        if len(shape) != 4 or min(shape) <= 0:
            raise ExportError(f"{path}: input shape {shape} is not a static NCHW shape")
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        return cls(
            path=path,
            input_name=inputs[0].name,
            output_name=graph.output[0].name,
            input_shape=shape,  # type: ignore[arg-type]
            opset=int(opset),
            max_abs_diff=max_abs_diff,
            exporter=exporter,
        )


def _export_once(model: nn.Module, example: torch.Tensor, path: Path, *, exporter: str, opset: int) -> None:
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        if exporter == "torchscript":
            torch.onnx.export(model, (example,), str(path), dynamo=False, do_constant_folding=True, **names)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False, **names)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) < 1500 else text[:1500] + " ..."


def _check_graph(path: Path, want_shape: tuple[int, ...]) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError / protobuf errors
        raise ExportError(f"{path}: onnx.checker rejects the exported graph: {_describe(exc)}") from exc
    got = OnnxExport.from_path(path)
    if (got.input_name, got.output_name) != (INPUT_NAME, OUTPUT_NAME):
        raise ExportError(
            f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got "
            f"{got.input_name!r} -> {got.output_name!r}"
        )
    if got.input_shape != want_shape:
        raise ExportError(f"{path}: input shape is {got.input_shape}, expected the static shape {want_shape}")


def _compare(model: nn.Module, path: Path, inputs: torch.Tensor, *, tolerance: float, name: str) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        ours = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[None].numpy()})[0] for x in inputs], axis=0)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ExportError(f"{path}: onnxruntime cannot run the exported graph: {_describe(exc)}") from exc
    device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.no_grad():
        ref = model(inputs.to(device)).float().cpu().numpy()
    if ours.shape != ref.shape:
        raise ExportError(f"{path}: onnxruntime output shape {ours.shape} != torch {ref.shape}")
    diff = float(np.max(np.abs(ours - ref)))
    scale = max(1.0, float(np.max(np.abs(ref))))
    if not np.isfinite(diff) or diff > tolerance * scale:
        raise ExportError(
            f"{name}: ONNX disagrees with PyTorch: max |diff| {diff:.3g} > {tolerance:g} x logit scale {scale:.3g} "
            f"on {len(inputs)} inputs; the export changed the model (check for train-mode layers or "
            "unsupported ops)"
        )
    return diff


def export_onnx(
    model: nn.Module,
    spec: ModelSpec,
    out: Path,
    *,
    opset: int = 18,
    check_images: np.ndarray | None = None,
    exporter: Exporter = "auto",
    tolerance: float = 1e-3,
    n_random: int = 2,
    seed: int = 0,
) -> OnnxExport:
    """Export `model` (put in eval mode for the export, then restored) to `out` and check it.

    `check_images` are raw uint8 NHWC images normalized with `spec.to_tensor`. The check fails when
    max |onnxruntime - torch| > tolerance x max(1, max |torch logit|). Raises ExportError.
    """
    out = Path(out)
    c, h, w = spec.input_shape
    want_shape = (1, c, h, w)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(want_shape, generator=gen)
    checks = [torch.randn((n_random, c, h, w), generator=gen)]
    if check_images is not None and len(check_images):
        if check_images.dtype != np.uint8 or check_images.shape[1:] != (h, w, c):
            raise ExportError(
                f"{spec.name}: check_images must be uint8 NHWC {(h, w, c)}, got {check_images.dtype} "
                f"{check_images.shape}"
            )
        checks.append(spec.to_tensor(check_images))
    order = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"], "dynamo": ["dynamo"]}[exporter]
    causes: list[str] = []
    try:
        for name in order:
            start = time.perf_counter()
            try:
                _export_once(model, example.to(device), tmp, exporter=name, opset=opset)
            except Exception as exc:  # exporters raise many types (UnsupportedOperatorError, TorchExportError ...)
                causes.append(f"{name}: {_describe(exc)}")
                log.warning("%s: %s ONNX export failed: %s", spec.name, name, causes[-1])
                tmp.unlink(missing_ok=True)
                continue
            log.info("%s: %s ONNX export took %.2f s", spec.name, name, time.perf_counter() - start)
            break
        else:
            raise ExportError(f"{spec.name}: ONNX export failed (opset {opset}): " + " | ".join(causes))
        _check_graph(tmp, want_shape)
        diff = _compare(model, tmp, torch.cat(checks), tolerance=tolerance, name=spec.name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    log.info("%s: wrote %s (%s, opset %d), max |diff| vs torch %.2e", spec.name, out, name, opset, diff)
    return OnnxExport(
        path=out,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        input_shape=want_shape,
        opset=opset,
        max_abs_diff=diff,
        exporter=name,
    )
