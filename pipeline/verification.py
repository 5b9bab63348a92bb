"""Compare converted TFLite models with the PyTorch model they came from, on real images.

For every precision: accuracy (when the images have labels), top-1 agreement with PyTorch, max and mean
|logit difference|. The same normalized tensor feeds both: NCHW for PyTorch, transposed to NHWC for TFLite.
`check_parity` turns the report into a pass/fail with the numbers in the message.

"Relative" differences divide by the logit scale max(1, max |torch logit|), so one tolerance fits models
whose logits are O(1) or O(10).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.convert.convert_tflite import TfliteFile
from pipeline.data.imageset import ImageSet
from pipeline.errors import VerificationError
from pipeline.models.spec import ModelSpec

log = logging.getLogger(__name__)

PROGRESS_MIN_IMAGES = 500  # show a progress bar from this many images on
DEFAULT_MIN_AGREEMENT: Mapping[str, float] = MappingProxyType({"fp32": 0.99, "fp16": 0.98, "int8": 0.90})
DEFAULT_MAX_REL_DIFF: Mapping[str, float] = MappingProxyType({"fp32": 1e-3, "fp16": 1e-2, "int8": 0.5})


@dataclass(frozen=True)
class PrecisionParity:
    """How one TFLite file compares with PyTorch on the same images."""

    precision: str
    path: Path
    size_bytes: int
    accuracy: float | None  # None when the images have no labels
    agreement: float  # share of images whose top-1 class equals PyTorch's
    max_abs_diff: float  # max |tflite logit - torch logit|
    mean_abs_diff: float
    rel_max_abs_diff: float  # max_abs_diff / logit_scale
    xnnpack: bool


@dataclass(frozen=True)
class VerifyReport:
    """Verification of every converted precision against PyTorch on `n_images` images of `data_source`."""

    model: str
    data_source: str
    n_images: int
    threads: int
    torch_accuracy: float | None
    logit_scale: float  # max(1, max |torch logit|)
    precisions: tuple[PrecisionParity, ...]  # one record per TFLite file, in the order given

    def record(self, precision: str) -> PrecisionParity:
        for rec in self.precisions:
            if rec.precision == precision:
                return rec
        raise KeyError(f"no {precision} record in this report (have {[r.precision for r in self.precisions]})")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; `precisions` is a list of per-precision dicts."""
        out = asdict(self)
        out["precisions"] = [{**asdict(r), "path": str(r.path)} for r in self.precisions]
        return out


def _torch_logits(model: nn.Module, x: torch.Tensor, *, batch: int = 256) -> np.ndarray:
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        with torch.no_grad():
            parts = [model(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    finally:
        model.train(was_training)
    return torch.cat(parts).numpy()


def _accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _run_file(rec: TfliteFile, images_nhwc: np.ndarray, *, threads: int) -> tuple[np.ndarray, bool]:
    from tqdm import tqdm

    from pipeline.tflite import load_interpreter, run_batch, uses_xnnpack

    interp = load_interpreter(rec.path, threads=threads)
    with tqdm(
        total=len(images_nhwc),
        desc=f"verify {rec.precision}",
        unit="img",
        file=sys.stderr,
        leave=False,
        disable=True if len(images_nhwc) < PROGRESS_MIN_IMAGES else None,  # None: off when not a terminal
    ) as bar:
        logits = run_batch(interp, images_nhwc, progress=bar.update)
    return logits, uses_xnnpack(interp)


def verify_tflite(
    files: Mapping[str, TfliteFile],
    torch_model: nn.Module,
    spec: ModelSpec,
    data: ImageSet,
    *,
    threads: int = 2,
    max_images: int | None = None,
) -> VerifyReport:
    """Run every file and the PyTorch model on `data` (a seeded subset of `max_images` when given)."""
    if not files:
        raise VerificationError("nothing to verify: no TFLite files given")
    spec.check_images(data)
    data = data.subset(max_images)
    if len(data) == 0:
        raise VerificationError(f"{data.source}: no images to verify on")
    x = spec.to_tensor(data.images)
    ref = _torch_logits(torch_model, x)
    scale = max(1.0, float(np.max(np.abs(ref))))
    ref_top1 = np.argmax(ref, axis=1)
    images_nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    records = []
    for precision, rec in files.items():
        logits, xnnpack = _run_file(rec, images_nhwc, threads=threads)
        if logits.shape != ref.shape:
            raise VerificationError(f"{rec.path}: output shape {logits.shape} != PyTorch {ref.shape}")
        diff = np.abs(logits - ref)
        parity = PrecisionParity(
            precision=precision,
            path=Path(rec.path),
            size_bytes=rec.size_bytes,
            accuracy=_accuracy(logits, data.labels),
            agreement=float(np.mean(np.argmax(logits, axis=1) == ref_top1)),
            max_abs_diff=float(diff.max()),
            mean_abs_diff=float(diff.mean()),
            rel_max_abs_diff=float(diff.max()) / scale,
            xnnpack=xnnpack,
        )
        log.info(
            "%s %s: agreement %.4f, max |diff| %.3g (rel %.3g), mean %.3g, accuracy %s",
            spec.name,
            precision,
            parity.agreement,
            parity.max_abs_diff,
            parity.rel_max_abs_diff,
            parity.mean_abs_diff,
            "n/a" if parity.accuracy is None else f"{parity.accuracy:.4f}",
        )
        records.append(parity)
    return VerifyReport(
        model=spec.name,
        data_source=data.source,
        n_images=len(data),
        threads=threads,
        torch_accuracy=_accuracy(ref, data.labels),
        logit_scale=scale,
        precisions=tuple(records),
    )


def check_parity(
    report: VerifyReport,
    *,
    min_agreement: Mapping[str, float] = DEFAULT_MIN_AGREEMENT,
    max_abs_diff: Mapping[str, float] = DEFAULT_MAX_REL_DIFF,
) -> None:
    """Raise VerificationError listing every precision outside tolerance.

    `max_abs_diff` bounds the *relative* max difference (`rel_max_abs_diff`, i.e. divided by
    max(1, max |torch logit|)). Precisions missing from a mapping are not checked for that criterion.
    """
    problems = []
    for rec in report.precisions:
        need = min_agreement.get(rec.precision)
        if need is not None and rec.agreement < need:
            problems.append(f"{rec.precision}: top-1 agreement {rec.agreement:.4f} < {need:.4f}")
        limit = max_abs_diff.get(rec.precision)
        if limit is not None and not rec.rel_max_abs_diff <= limit:
            problems.append(
                f"{rec.precision}: max |logit diff| {rec.max_abs_diff:.3g} = {rec.rel_max_abs_diff:.3g} x logit "
                f"scale {report.logit_scale:.3g} > {limit:g}"
            )
    if problems:
        raise VerificationError(
            f"{report.model}: TFLite disagrees with PyTorch on {report.n_images} images of {report.data_source}: "
            + "; ".join(problems)
        )
