"""The remedies, applied in order until the int8 model agrees with PyTorch on `min_agreement` of the
validation images (top-1), each one measured and recorded.

0. plain post-training quantization (what the convert stage gave): measured, per-op error computed.
With `max_accuracy_drop` set, a model must also keep its validation accuracy within that much of the float
model's before the remedies stop (`meets`).

1. `calibration`: more calibration images (the calibration set plus training images, up to
   `CALIBRATION_FACTOR` x the profile's count), the same pool with the images that set extreme activation
   ranges dropped (pipeline/quantize/calibset.py), and the full pool with each of `quantize.calibration_ranges`
   in place of TensorFlow's calibrator's min/max ("measured": the true min/max, which the calibrator gets
   wrong for tensors an in-place op reuses; "mse", "percentile:Q": from histograms. onnx2tf 1.29 has no range
   option, so tfconv rewrites the calibrated model's ranges before TensorFlow's quantizer:
   pipeline/quantize/ranges.py); the best of these is the remedy's model, and the remedies after it that
   convert again keep its range method.
2. `equalization`: cross-layer equalization + bias correction in PyTorch (pipeline/quantize/equalize.py),
   re-exported and re-converted.
3. `range_tuning`: the int8 file itself, each activation range scaled (x0.3 to x1.3, zero point kept) where
   that lowers the KL divergence of the file's softmax from the float file's on calibration images, tensor
   by tensor in graph order (pipeline/quantize/rangefix.py). Still full-integer; `selective` applies the
   same factors to its re-quantized file.
4. `bias_correction`: the int8 file itself, each op's mean per-channel error against the float file on
   calibration images taken out of its int32 bias, op by op in graph order (pipeline/quantize/biasfix.py).
   Still full-integer, so Edge TPU targets get it too; `selective` re-quantizes from the SavedModel and
   corrects its file again when the model it starts from was corrected.
5. `selective`: the ops with the largest share of the error kept in float (1, 2, 4 ... up to
   `max_float_ops`), re-quantized from the same SavedModel (pipeline/quantize/tfconv.py). Never on Edge TPU
   targets: they must stay full-integer.
6. `qat`: quantization-aware distillation (pipeline/quantize/qat.py), exported through the same converter,
   its ranges written by tfconv: the calibration remedy's range method on its pool when it chose one (QAT
   then trains against the ranges that method picks), else the measured min/max of the profile's calibration
   set (not the trimmed pool `calibration` may have kept: measured on the MobileNetV2-style bench model in an
   earlier run, QAT on the trimmed pool's ranges 0.974 agreement, on the profile's 200 images 0.988). Its
   checkpoint is picked on QAT_HOLDOUT training images held out of its training (qat.py), never on the
   validation split that then judges it. With `range_tuning` and `bias_correction` among the remedies,
   QAT's file is then range-tuned and bias-corrected too, each step kept only when it measures better (every
   try recorded: `qat_tries`).

A remedy is kept only when it raises the agreement (ties: higher accuracy); later remedies start from the best
model so far. Every number here is on the validation split, never the test split.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.data.imageset import ImageSet
from pipeline.errors import ConversionError
from pipeline.models.spec import ModelSpec
from pipeline.quantize.budget import drop_within
from pipeline.quantize.calibset import trim_outliers
from pipeline.quantize.flips import disagreements, flips_text, float_margins

log = logging.getLogger(__name__)

# the order they run in
REMEDIES = ("calibration", "equalization", "range_tuning", "bias_correction", "selective", "int16x8", "qat")
FLOAT_REMEDIES = ("selective", "int16x8")  # leave float or int16 ops: never on Edge TPU targets
CALIBRATION_FACTOR = 4
QAT_HOLDOUT = 500  # training images QAT keeps out of its training to pick its checkpoint on
OP_ERROR_IMAGES = 64
BIAS_IMAGES = 64  # calibration images bias correction measures each op's shift on (about 40 s for 59 ops)
RANGE_IMAGES = 128  # calibration images range tuning scores each trial on


@dataclass(frozen=True)
class RemedyJob:
    """Everything the remedies need; `extra_args(onnx_path)` gives the target's onnx2tf options."""

    model: nn.Module  # the float model, as exported (Edge TPU rewrites applied): the reference
    spec: ModelSpec
    onnx: Path  # its ONNX export
    fp32: Path | None  # its float TFLite file (None: converted again here)
    int8: Path  # its plain PTQ int8 file
    saved_model: Path | None  # the SavedModel both came from (None: converted again when selective needs it)
    val: ImageSet
    calibration: ImageSet  # the calibration set used for the plain conversion
    extra_calibration: ImageSet  # training images to add for more calibration
    train: ImageSet  # for QAT
    min_agreement: float
    remedies: tuple[str, ...]
    int8_io: str
    full_integer_only: bool  # Edge TPU: no float ops
    max_float_ops: int
    qat_steps: int
    threads: int
    seed: int
    extra_args: Callable[[Path], Sequence[str]] = lambda _: ()
    max_accuracy_drop: float | None = None  # a fraction of the float accuracy (None: agreement alone decides)
    timing: Callable[[Path], float] | None = None  # p50 ms of a .tflite file, when latency is measured
    calibration_ranges: tuple[str, ...] = ()  # the range methods `calibration` also tries (tfconv "ranges")


@dataclass
class Candidate:
    name: str
    int8: Path
    fp32: Path
    saved_model: Path | None
    model: nn.Module  # the float model this int8 file was converted from
    calibration: ImageSet
    ranges: str | None = None  # activation ranges from histograms ("mse", "percentile:Q"); None: min/max
    bias_corrected: bool = False  # its int8 file's biases were corrected (biasfix.py) after quantization
    range_factors: dict[str, float] | None = None  # tensor name -> factor, when range_tuning edited its file
    agreement: float = 0.0
    accuracy: float | None = None
    size_bytes: int = 0
    p50_ms: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    flips: dict[str, Any] = field(default_factory=dict)  # where it disagrees with PyTorch (flips.disagreements)

    def row(self, kept: bool) -> dict[str, Any]:
        return {
            "remedy": self.name,
            "agreement": self.agreement,
            "accuracy": self.accuracy,
            "size_bytes": self.size_bytes,
            "p50_ms": self.p50_ms,
            "kept": kept,
            "flips": self.flips,
            **self.details,
        }


class _Ref:
    """PyTorch's answers on the validation images, and the same images as NHWC for TFLite."""

    def __init__(self, job: RemedyJob) -> None:
        from pipeline.verification import _torch_logits

        x = job.spec.to_tensor(job.val.images)
        logits = _torch_logits(job.model, x)
        self.top1 = np.argmax(logits, axis=1)
        self.margin = float_margins(logits)  # the float model's top-1 minus top-2 probability
        self.labels = job.val.labels
        self.fp32_accuracy = None if self.labels is None else float(np.mean(self.top1 == self.labels))
        self.nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())

    def measure(self, c: Candidate, job: RemedyJob) -> Candidate:
        from pipeline.tflite import run_batch

        logits = run_batch(c.int8, self.nhwc, threads=job.threads)
        top1 = np.argmax(logits, axis=1)
        c.flips = disagreements(top1, self.top1, self.margin)
        c.agreement = float(np.mean(top1 == self.top1))
        c.accuracy = None if self.labels is None else float(np.mean(top1 == self.labels))
        c.size_bytes = c.int8.stat().st_size
        c.p50_ms = job.timing(c.int8) if job.timing is not None else None
        log.info("%s: int8 agreement %.4f on %d validation images", c.name, c.agreement, len(self.top1))
        return c


def drop_of(c: Candidate, ref: _Ref) -> float | None:
    """The float model's validation accuracy minus the int8 file's (None without labels)."""
    if ref.fp32_accuracy is None or c.accuracy is None:
        return None
    return ref.fp32_accuracy - c.accuracy


def meets(c: Candidate, job: RemedyJob, ref: _Ref) -> bool:
    """min_agreement reached and, when max_accuracy_drop is set (and labels are known), the drop within it."""
    if c.agreement < job.min_agreement:
        return False
    drop = drop_of(c, ref)
    return job.max_accuracy_drop is None or drop is None or drop_within(drop, job.max_accuracy_drop)


def _better(a: Candidate, b: Candidate, job: RemedyJob, ref: _Ref) -> bool:
    """Meeting the goal first, then agreement, then accuracy."""
    return (meets(a, job, ref), a.agreement, a.accuracy or 0.0) > (meets(b, job, ref), b.agreement, b.accuracy or 0.0)


def _convert(job: RemedyJob, model: nn.Module, calib: ImageSet, work: Path, name: str) -> Candidate:
    """Export `model` and convert it (fp32 + int8, SavedModel kept) with onnx2tf in `work/name`."""
    from pipeline.convert.convert_tflite import convert_tflite
    from pipeline.convert.export_onnx import OnnxExport, export_onnx

    folder = work / name
    if model is job.model:
        onnx = OnnxExport.from_path(job.onnx)
    else:
        onnx = export_onnx(model, job.spec, folder / "model.onnx", check_images=calib.images[:8], tolerance=1.0)
    files = convert_tflite(
        onnx,
        job.spec,
        folder,
        precisions=("fp32", "int8"),
        calibration=calib,
        int8_io=job.int8_io,
        log_path=folder / "onnx2tf.log",
        extra_args=tuple(job.extra_args(Path(onnx.path))),
        saved_model_dir=folder / "saved_model",
    )
    return Candidate(name, files["int8"].path, files["fp32"].path, folder / "saved_model", model, calib)


def _calibration(job: RemedyJob, best: Candidate, work: Path, ref: _Ref) -> Candidate:
    want = CALIBRATION_FACTOR * len(job.calibration)
    extra = job.extra_calibration.subset(max(0, want - len(job.calibration)), seed=job.seed)
    images = np.concatenate([job.calibration.images, extra.images])
    calib = ImageSet(images, None, job.calibration.class_names, f"{job.calibration.source} + {extra.source}")
    more = ref.measure(_convert(job, best.model, calib, work, "calibration"), job)
    more.name = f"calibration ({len(calib)} images)"
    more.details = {"pool_images": len(calib), "calibration_images": len(calib), "outliers_dropped": 0,
                    "ranges": "minmax"}  # fmt: skip
    winner, tries = more, [_calibration_try(more)]
    trimmed = trim_outliers(best.model, job.spec.to_tensor(images))
    if trimmed.dropped:
        kept = ImageSet(images[trimmed.keep], None, calib.class_names,
                        f"{calib.source}, {trimmed.dropped} outlier images dropped")  # fmt: skip
        t = ref.measure(_convert(job, best.model, kept, work, "calibration-trimmed"), job)
        t.name = f"calibration ({len(kept)} images, {trimmed.dropped} outliers dropped)"
        t.details = {"pool_images": len(calib), "calibration_images": len(kept), "outliers_dropped": trimmed.dropped,
                     "ranges": "minmax"}  # fmt: skip
        tries.append(_calibration_try(t))
        winner = t if _better(t, more, job, ref) else more
    for method in job.calibration_ranges:
        try:
            r = ref.measure(_with_ranges(job, more, method, work / "calibration-ranges"), job)
        except ConversionError as exc:  # one range method failing leaves the others and min/max standing
            log.warning("calibration with %s ranges failed, skipped: %s", method, exc)
            tries.append({"calibration_images": len(calib), "ranges": method, "failed": str(exc)[-500:]})
            continue
        r.name = f"calibration ({len(calib)} images, {method.replace(':', ' ')} ranges)"
        tries.append(_calibration_try(r))
        if _better(r, winner, job, ref):
            winner = r
    winner.details.update(was=len(job.calibration), tries=tries)
    return winner


def _calibration_try(c: Candidate) -> dict[str, Any]:
    keys = ("calibration_images", "outliers_dropped", "ranges", "ranges_changed")
    return {**{k: c.details[k] for k in keys if k in c.details}, "agreement": c.agreement, "accuracy": c.accuracy}


def _with_ranges(job: RemedyJob, base: Candidate, method: str, folder: Path) -> Candidate:
    """`base`'s SavedModel quantized again with activation ranges from histograms on its calibration images
    (`method`: "mse" or "percentile:Q", pipeline/quantize/ranges.py) in place of TensorFlow's min/max. The
    calibration remedy gives it the full pool, not the trimmed one: a range method clips extreme activations
    itself. Later remedies that convert again keep the method (`Candidate.ranges`)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = requantize_float(job, base, (), folder / f"{method.replace(':', '_')}.tflite", ranges=method)
    changed = json.loads(out.with_name(f"{out.stem}.ranges.json").read_text())
    c = Candidate(base.name, out, base.fp32, base.saved_model, base.model, base.calibration, ranges=method)
    c.details = {**base.details, "ranges": method, "ranges_changed": len(changed["changed"]),
                 "ranges_tensors": changed["tensors"]}  # fmt: skip
    return c


def _equalization(job: RemedyJob, best: Candidate, work: Path, ref: _Ref) -> Candidate:
    from pipeline.quantize.equalize import equalize

    calib = torch.as_tensor(job.spec.to_tensor(best.calibration.subset(256, seed=job.seed).images))
    model, rec = equalize(best.model, calib)
    c = _convert(job, model, best.calibration, work, "equalization")
    if best.ranges is not None:  # the calibration remedy's ranges, chosen on the model before equalization
        c = _with_ranges(job, c, best.ranges, work / "equalization-ranges")
    c.details = {**rec.to_dict(), **c.details}  # with the ranges' record when they were applied
    return ref.measure(c, job)


def _range_tuning(job: RemedyJob, best: Candidate, work: Path, folder: str = "range-tuning") -> Candidate:
    """`best`'s int8 file with its activation ranges tuned on RANGE_IMAGES of its calibration images, in
    work/folder."""
    from pipeline.quantize.rangefix import tune_ranges

    out = work / folder / f"{best.int8.stem}.tflite"
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = tune_ranges(best.fp32, best.int8, _calibration_nhwc(job, best, RANGE_IMAGES), out)
    if rec.groups == 0:
        raise _Skipped("no activation range in the file can be rescaled")
    c = Candidate(f"range_tuning ({rec.changed} of {rec.groups} ranges)", out, best.fp32, best.saved_model,
                  best.model, best.calibration, ranges=best.ranges, bias_corrected=best.bias_corrected,
                  range_factors=_compose(best.range_factors, rec.by_tensor))  # fmt: skip
    c.details = {**({"ranges": best.details["ranges"]} if "ranges" in best.details else {}), **rec.to_dict()}
    return c


def _calibration_nhwc(job: RemedyJob, c: Candidate, n: int) -> np.ndarray:
    """`n` of `c`'s calibration images (all, if fewer), seeded, as the normalized NHWC floats TFLite takes."""
    images = c.calibration.subset(min(n, len(c.calibration)), seed=job.seed)
    return np.ascontiguousarray(job.spec.to_tensor(images.images).permute(0, 2, 3, 1).numpy())


def _compose(before: dict[str, float] | None, after: dict[str, float]) -> dict[str, float]:
    """Factors relative to the converter's ranges when `after` was tuned on a file already scaled by `before`."""
    both = dict(before or {})
    for name, f in after.items():
        both[name] = both.get(name, 1.0) * f
    return both


def _bias_correction(job: RemedyJob, best: Candidate, work: Path, folder: str = "bias-correction") -> Candidate:
    """`best`'s int8 file with its biases corrected on BIAS_IMAGES of its calibration images, in work/folder."""
    out = work / folder / f"{best.int8.stem}.tflite"
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = _correct(job, best, out)
    c = Candidate(f"bias_correction ({rec['bias_corrected_ops']} ops)", out, best.fp32, best.saved_model, best.model,
                  best.calibration, ranges=best.ranges, bias_corrected=True,
                  range_factors=best.range_factors)  # fmt: skip
    c.details = {**({"ranges": best.details["ranges"]} if "ranges" in best.details else {}), **rec}
    return c


def _correct(job: RemedyJob, c: Candidate, out: Path) -> dict[str, Any]:
    from pipeline.quantize.biasfix import correct_biases

    rec = correct_biases(c.fp32, c.int8, _calibration_nhwc(job, c, BIAS_IMAGES), out)
    if rec.ops_corrected == 0:
        raise _Skipped("no int8 op with an int32 bias to correct")
    return rec.to_dict()


def _qat(job: RemedyJob, best: Candidate, work: Path, ref: _Ref) -> Candidate:
    from pipeline.quantize.qat import qat_finetune

    x = job.spec.to_tensor(job.train.images)
    y = None if job.train.labels is None else torch.from_numpy(job.train.labels).long()
    # checkpoints are scored on training images held out of QAT's own training, not on the validation split:
    # picking the best of many checkpoints on the images the agreement is then measured on would inflate it
    held = min(QAT_HOLDOUT, len(x) // 5)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(job.seed))
    hold, fit = order[:held], order[held:]
    # the calibration remedy's range method on its pool, else the measured min/max of the profile's calibration
    # set, untrimmed (module docstring), all of it: QAT trains against the ranges the exported model is then
    # given from the same images (qat.py). Written by tfconv, not left to TFLite's calibrator, whose min/max
    # for a tensor an in-place op overwrites is the op's output range (ranges.py), not what QAT trained with
    method = best.ranges or "measured"
    images = best.calibration if best.ranges else job.calibration
    calib = job.spec.to_tensor(images.images)
    model, rec = qat_finetune(best.model, x[fit], None if y is None else y[fit], calib, val=x[hold] if held else None,
                              steps=job.qat_steps, seed=job.seed, ranges=method)  # fmt: skip
    c = _with_ranges(job, _convert(job, model, images, work, "qat"), method, work / "qat-ranges")
    c.details = {**rec.to_dict(), **{k: v for k, v in c.details.items() if k.startswith("ranges_")}}
    return _qat_finished(job, ref.measure(c, job), work, ref)


QAT_FINISHES = ("range_tuning", "bias_correction")  # applied to QAT's file too, in this order, when listed


def _qat_finished(job: RemedyJob, c: Candidate, work: Path, ref: _Ref) -> Candidate:
    """QAT's file as exported, then range-tuned (rangefix.py) and bias-corrected (biasfix.py) when those
    remedies are listed, each step kept only when it measures better: the best ships, every try is recorded
    (`qat_tries`). QAT trains against its own simulation of int8, which the converter's file does not match
    exactly (requantize rounding, the ranges recalibrated at export), so its ranges and biases can still be off."""
    tries: list[dict[str, Any]] = [{"file": "exported", "agreement": c.agreement, "accuracy": c.accuracy, "kept": True}]
    steps: list[str] = []
    best = c
    for name in QAT_FINISHES:
        if name not in job.remedies:
            continue
        label = " + ".join(["exported", *steps, name])
        try:
            if name == "range_tuning":
                t = _range_tuning(job, best, work, "qat-range-tuning")
            else:
                t = _bias_correction(job, best, work, "qat-bias-correction")
        except _Skipped as exc:
            tries.append({"file": label, "skipped": str(exc), "kept": False})
            continue
        t = ref.measure(t, job)
        kept = _better(t, best, job, ref)
        tries.append({"file": label, "agreement": t.agreement, "accuracy": t.accuracy, "kept": kept})
        if kept:  # QAT's record, with each kept step's own under its name (both have `ranges_changed`)
            t.details = {**best.details, name: {k: v for k, v in t.details.items() if k != "ranges"}}
            best = t
            steps.append(name)
    if steps:
        best.name = "qat (" + ", ".join(_FINISHED[s](best.details[s]) for s in steps) + ")"
    best.details["qat_tries"] = tries
    return best


_FINISHED = {
    "range_tuning": lambda d: f"range-tuned, {d['ranges_changed']} of {d['ranges_tunable']} ranges",
    "bias_correction": lambda d: f"bias-corrected, {d['bias_corrected_ops']} ops",
}


def requantize_float(job: RemedyJob, best: Candidate, tensors: Sequence[str], out: Path, *, mode: str = "int8",
                     ranges: str | None = None) -> Path:  # fmt: skip
    """`best`'s SavedModel quantized again with `tensors` (op outputs) kept float, or (mode "16x8") with int16
    activations, and with `ranges` (tfconv: "mse" | "percentile:Q") in place of min/max; returns the file."""
    from pipeline.proc import run_tool

    folder = out.parent
    calib = folder / f"{out.stem}.calib.npy"
    np.save(calib, best.calibration.images.astype(np.float32) / np.float32(255.0))
    spec = job.spec
    payload = {
        "saved_model": str(best.saved_model),
        "calibration": str(calib),
        "mean": list(spec.mean),
        "std": list(spec.std),
        "per_channel": True,
        "int8_io": job.int8_io,
        "denylisted_nodes": list(tensors),
        "out": str(out),
        "mode": mode,
        "ranges": ranges,
        "ranges_out": str(folder / f"{out.stem}.ranges.json"),
    }
    job_file = folder / f"{out.stem}.job.json"
    job_file.write_text(json.dumps(payload))
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "-1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    done = run_tool(
        [sys.executable, "-m", "pipeline.quantize.tfconv", str(job_file)],
        timeout_s=900,
        env=env,
        log_file=folder / f"{out.stem}.log",
    )
    if done.rc != 0 or not out.is_file():
        tail = (folder / f"{out.stem}.log").read_text(errors="replace")[-1500:]
        what = ("16x8 quantization" if mode == "16x8" else "selective quantization" if tensors
                else f"quantization with {ranges} activation ranges")  # fmt: skip
        raise ConversionError(f"{what} of {best.saved_model} failed (exit {done.rc}):\n{tail}")
    return out


def _selective(job: RemedyJob, best: Candidate, work: Path, ref: _Ref, errors: Any) -> tuple[Candidate, list]:
    """Keep the 1, 2, 4 ... worst ops float until min_agreement is met; the best try and every try's row."""
    ranked = [o for o in errors.worst(job.max_float_ops) if o.share > 0]
    if best.saved_model is None:  # the convert stage kept no SavedModel: the same conversion once more
        again = _convert(job, best.model, best.calibration, work, "plain")
        best = Candidate(best.name, again.int8, again.fp32, again.saved_model, best.model, best.calibration,
                         ranges=best.ranges, bias_corrected=best.bias_corrected,
                         range_factors=best.range_factors)  # fmt: skip
    tries: list[dict[str, Any]] = []
    chosen: Candidate | None = None
    k = 1
    (work / "selective").mkdir(parents=True, exist_ok=True)
    while ranked and k <= len(ranked):
        ops = ranked[:k]
        tensors = [t for o in ops for t in (o.tensor, *o.passthrough)]
        path = requantize_float(job, best, tensors, work / "selective" / f"float{k}.tflite", ranges=best.ranges)
        tuned = _retune(best, path)
        fixed = None
        if best.bias_corrected:  # the same correction on the re-quantized file (its float ops have no int32 bias)
            try:
                fixed = _correct(job, replace(best, int8=path), path)
            except _Skipped:  # every biased op kept float: nothing left to correct
                fixed = None
        c = Candidate(
            f"selective ({k} float op{'s' if k > 1 else ''})",
            path,
            best.fp32,
            best.saved_model,
            best.model,
            best.calibration,
            ranges=best.ranges,
            bias_corrected=fixed is not None,
            range_factors=best.range_factors,
        )
        c.details = {"float_ops": [o.where() for o in ops], "float_tensors": tensors, **tuned, **(fixed or {})}
        if best.ranges:
            c.details["ranges"] = best.ranges
        ref.measure(c, job)
        tries.append({"float_ops": k, "agreement": c.agreement, "p50_ms": c.p50_ms})
        if chosen is None or _better(c, chosen, job, ref):
            chosen = c
        if meets(c, job, ref) or k == len(ranked):
            break
        k = min(2 * k, len(ranked))
    if chosen is None:
        raise _Skipped("no op adds measurable error: nothing to keep in float")
    chosen.details["tries"] = tries
    return chosen, tries


def _retune(best: Candidate, path: Path) -> dict[str, Any]:
    """The range factors `best` was tuned with, applied in place to a file re-quantized from its SavedModel."""
    if not best.range_factors:
        return {}
    from pipeline.quantize.rangefix import apply_factors

    return {"ranges_retuned": apply_factors(path, best.range_factors, path)}


def _int16x8(job: RemedyJob, best: Candidate, work: Path) -> Candidate:
    """`best`'s SavedModel with int16 activations and int8 weights (float I/O): 256x finer activation steps
    for twice the activation memory, on TFLite's built-in kernels (XNNPACK does not accelerate 16x8)."""
    if best.saved_model is None:
        again = _convert(job, best.model, best.calibration, work, "plain")
        best = Candidate(best.name, again.int8, again.fp32, again.saved_model, best.model, best.calibration)
    (work / "int16x8").mkdir(parents=True, exist_ok=True)
    path = requantize_float(job, best, (), work / "int16x8" / "model_16x8.tflite", mode="16x8")
    c = Candidate("int16x8 (int16 activations, int8 weights)", path, best.fp32, best.saved_model, best.model,
                  best.calibration)  # fmt: skip
    c.details = {"activations": "int16", "weights": "int8", "io": "float32"}
    return c


class _Skipped(Exception):
    pass


def _errors(c: Candidate, job: RemedyJob, ref: _Ref) -> Any:
    from pipeline.quantize.operrors import op_errors

    example = job.spec.to_tensor(job.val.images[:1])
    return op_errors(
        c.fp32,
        c.int8,
        ref.nhwc[:OP_ERROR_IMAGES],
        model=c.model,
        example=example,
        source=f"{min(len(ref.nhwc), OP_ERROR_IMAGES)} images of {job.val.source}",
    )


def _try(name: str, job: RemedyJob, best: Candidate, work: Path, ref: _Ref, errors: Any) -> Candidate:
    from pipeline.quantize.equalize import EqualizeSkipped

    try:
        if name == "calibration":
            return _calibration(job, best, work, ref)
        if name == "equalization":
            return _equalization(job, best, work, ref)
        if name == "range_tuning":
            return ref.measure(_range_tuning(job, best, work), job)
        if name == "bias_correction":
            return ref.measure(_bias_correction(job, best, work), job)
        if name == "selective":
            if job.full_integer_only:
                raise _Skipped("Edge TPU targets must stay full-integer: no op may stay float")
            return _selective(job, best, work, ref, errors)[0]
        if name == "int16x8":
            if job.full_integer_only:
                raise _Skipped("Edge TPU targets run int8 only: no int16 activations")
            return ref.measure(_int16x8(job, best, work), job)
        return _qat(job, best, work, ref)
    except EqualizeSkipped as exc:
        raise _Skipped(str(exc)) from exc


def run_remedies(job: RemedyJob, out: Path) -> dict[str, Any]:
    """Apply the remedies in order until min_agreement is met; write the winner to out/model_int8.tflite and
    return the record the report and manifest show (the per-op errors of the first and the final model)."""
    work = out / ".quantize"
    work.mkdir(parents=True, exist_ok=True)
    ref = _Ref(job)
    plain = Candidate("plain PTQ", job.int8, job.fp32, job.saved_model, job.model, job.calibration)  # type: ignore[arg-type]
    if job.fp32 is None:
        plain = _convert(job, job.model, job.calibration, work, "plain")
        plain.name = "plain PTQ"
    ref.measure(plain, job)
    best, rows = plain, [plain.row(True)]
    first_errors = errors = _errors(plain, job, ref)
    for name in REMEDIES:
        if meets(best, job, ref) or name not in job.remedies:
            continue
        try:
            c = _try(name, job, best, work, ref, errors)
        except _Skipped as exc:
            rows.append({"remedy": name, "skipped": str(exc), "kept": False})
            continue
        kept = _better(c, best, job, ref)
        rows.append(c.row(kept))
        if kept:
            best = c
            errors = _errors(best, job, ref)
    result = _record(job, best, rows, (first_errors, errors), ref, plain.fp32)
    if best is not plain:
        shutil.copyfile(best.int8, out / ".model_int8.tmp")
        os.replace(out / ".model_int8.tmp", out / "model_int8.tflite")
    shutil.rmtree(work, ignore_errors=True)
    return result


def _record(job: RemedyJob, best: Candidate, rows: list, errs: tuple, ref: _Ref, first_fp32: Path) -> dict[str, Any]:
    first, final = errs
    met = meets(best, job, ref)
    drop = drop_of(best, ref)
    fp32_ms = job.timing(first_fp32) if job.timing is not None else None
    holding = [o.where() for o in final.worst(5) if o.share > 0]
    flips = best.flips
    why = None if met else " ".join(filter(None, [advice(job, best, holding, drop), flips_text(flips, len(ref.top1))]))
    return {
        "min_agreement": job.min_agreement,
        "max_accuracy_drop": job.max_accuracy_drop,
        "met": met,
        "fp32_accuracy": ref.fp32_accuracy,
        "accuracy_drop": drop,
        "val_images": len(ref.top1),
        "data": job.val.source,
        "agreement": best.agreement,
        "accuracy": best.accuracy,
        "shipped": best.name,
        "float_ops": best.details.get("float_ops", []),
        "size_bytes": best.size_bytes,
        "p50_ms": best.p50_ms,
        "plain_p50_ms": rows[0]["p50_ms"],
        "fp32_p50_ms": fp32_ms,
        "steps": rows,
        "op_errors": {"plain": first.to_dict(), "final": final.to_dict()},
        "holding_back": holding,
        "disagreements": flips,
        "advice": why,
    }


def advice(job: RemedyJob, best: Candidate, holding: Sequence[str], drop: float | None = None) -> str:
    """What to change when no remedy reached min_agreement (or kept the accuracy within max_accuracy_drop)."""
    ops = "; ".join(holding[:3]) or "no single op stands out"
    after = ", ".join(job.remedies) or "no remedies"
    if best.agreement >= job.min_agreement and drop is not None and job.max_accuracy_drop is not None:
        miss = (
            f"int8 validation accuracy is {100 * drop:.2f} points below the float model's on {len(job.val)} "
            f"validation images, more than quantize.max_accuracy_drop {job.max_accuracy_drop:g} after {after}"
        )
    else:
        miss = (
            f"int8 top-1 agreement with PyTorch is {best.agreement:.4f} on {len(job.val)} validation images, "
            f"below quantize.min_agreement {job.min_agreement:g} after {after}"
        )
    tips = [f"{miss}. The ops holding it back: {ops}."]
    unlisted = [r for r in REMEDIES if r not in job.remedies and not (job.full_integer_only and r in FLOAT_REMEDIES)]
    if unlisted:
        slow = " (int16 activations: TFLite's built-in kernels, slower than int8)" if "int16x8" in unlisted else ""
        tips.append(f"List the remedies not tried in quantize.remedies: {', '.join(unlisted)}{slow};")
    if job.full_integer_only:
        tips.append(
            "Edge TPU models must stay full-integer: bound those layers' activations (ReLU6 instead of "
            "SiLU/hard-swish, BatchNorm before wide-range adds), raise quantize.qat_steps,"
        )
    else:
        tips.append(
            "Allow more float ops (quantize.max_float_ops), raise quantize.qat_steps, ship fp16 or fp32 "
            "(quantize.ship),"
        )
    tips.append("or lower quantize.min_agreement.")
    return " ".join(tips)
