"""Convert a checked ONNX export to TFLite (fp32 / fp16 / int8) with onnx2tf 1.29.x, run as a subprocess.

onnx2tf calls `sys.exit` from library code, pulls in TensorFlow, and overwrites its input file (it saves the
onnxsim-simplified graph over `-i`), so it runs as `python -m onnx2tf` in its own temporary working directory
inside `out_dir`, on a copy of the ONNX file named `model.onnx`. It emits, in `-o`:

    model_float32.tflite, model_float16.tflite                     always
    model_dynamic_range_quant.tflite, model_integer_quant.tflite,   with -oiqt
    model_full_integer_quant.tflite, model_*_with_int16_act.tflite

`fp32` <- model_float32, `fp16` <- model_float16 (fp16 weights, float32 I/O), `int8` <- model_integer_quant
(int8 inside, float32 I/O) when `int8_io="float32"`, else model_full_integer_quant (int8 or uint8 I/O via
`-iqd/-oqd`). The requested files are renamed to model_fp32/fp16/int8.tflite and moved (atomic rename on the
same filesystem) into `out_dir`; everything else is deleted with the working directory.

Flags chosen (`onnx2tf -h`):
- `-b 1`: fix the batch to 1 (a no-op for our static exports, a guard for ONNX files from elsewhere).
- `-osd`: signature defs on the saved model. `-oiqt` turns them on anyway, so with it fp32/fp16 come from the
  same saved model whether or not int8 is requested; no measurable cost here (4.3-4.5 s either way). The
  .tflite files carry a `serving_default` signature keyed `input` -> `logits` (int8: `output_0`).
- `-v info`: the default level is `debug`; `info` keeps the stage banners, warnings and errors (about 120
  lines) for the log and the error tail.
- `-oiqt -qt <per-channel|per-tensor> -cind input calib.npy "[[[[mean]]]]" "[[[[std]]]]" -iqd X -oqd X` only
  when int8 is requested: it adds a dynamic-range, two int8 and two int16-activation conversions (the last
  three calibrated; 4.3 s -> 6.6 s for a 4-conv 28x28 CNN with 200 calibration images on 2 cores; there is
  no flag to skip the int16 ones). Calibration data is NHWC float32 in 0-1; onnx2tf applies
  (x - mean) / std itself.
- Not used: `-coion` (renaming I/O tensors to the ONNX names needs the `flatc` binary, which onnx2tf would
  tell you to wget; without it the option only prints a warning), `-dsm` (faster, but skips the accuracy
  correction of strict mode), `-cotof` (slow per-op check; verify.py compares against PyTorch instead),
  `-n` (hides the warnings that explain a failed int8 step).
- Network: onnx2tf fetches `calibration_image_sample_data_20x128x128x3_float32.npy` from GitHub for
  RGB-like inputs even when `-cind` is given (it uses it for its dummy inference); a seeded 0-1 array of that
  name is written into its working directory, so it never goes online.
- PATH: onnx2tf runs `onnxsim` by name; the interpreter's bin directory is put first on PATH, otherwise the
  simplification step is silently skipped.

Traps: onnx2tf only warns (exit 0) when an int8 step fails, so every requested file is checked to exist and
to have the expected I/O dtypes. With `-cind`, its dummy-inference check feeds the NHWC calibration array
to the NCHW ONNX graph and logs "The optimization process for shape estimation is skipped" - harmless for
CNNs (fp32 output is numerically the same as without -cind).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.artifacts import write_text_atomic
from pipeline.convert.export_onnx import OnnxExport
from pipeline.data.imageset import ImageSet
from pipeline.errors import ConversionError, DatasetError, UsageError, VerificationError
from pipeline.models.spec import ModelSpec
from pipeline.proc import run_tool

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
TAIL_LINES = 40
_SAMPLE_NAME = "calibration_image_sample_data_20x128x128x3_float32.npy"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# TensorFlow start-up chatter that would crowd the error tail (kept in the full log)
_NOISE = re.compile(r"^([EWI]\d{4} .*(cuda_dnn|cuda_blas|computation_placer)|WARNING: All log messages before absl)")


@dataclass(frozen=True)
class TfliteFile:
    """One converted model on disk and its I/O contract (NHWC input)."""

    precision: str
    path: Path
    size_bytes: int
    input_dtype: str
    input_shape: tuple[int, ...]
    output_dtype: str
    output_shape: tuple[int, ...]
    input_quantization: tuple[float, int] | None  # (scale, zero_point) for quantized I/O
    output_quantization: tuple[float, int] | None


def _emitted_name(precision: str, int8_io: str) -> str:
    if precision == "fp32":
        return "model_float32.tflite"
    if precision == "fp16":
        return "model_float16.tflite"
    return "model_integer_quant.tflite" if int8_io == "float32" else "model_full_integer_quant.tflite"


def _vector(values: Sequence[float]) -> str:
    return "[[[[" + ",".join(repr(float(v)) for v in values) + "]]]]"


def _argv(
    onnx: OnnxExport, spec: ModelSpec, *, int8: bool, int8_io: str, quant_type: str, extra: Sequence[str] = ()
) -> list[str]:
    argv = [sys.executable, "-m", "onnx2tf", "-i", "model.onnx", "-o", "out", "-b", "1", "-osd", "-v", "info"]
    argv += list(extra)
    if int8:
        argv += ["-oiqt", "-qt", quant_type, "-cind", onnx.input_name, "calib.npy"]
        argv += [_vector(spec.mean), _vector(spec.std)]
        if int8_io != "float32":
            argv += ["-iqd", int8_io, "-oqd", int8_io]
    return argv


def _env() -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    if shutil.which("onnxsim", path=env["PATH"]) is None:
        log.warning("onnxsim not found on PATH: onnx2tf will skip simplifying the graph")
    return env


def _tail(text: str, n: int = TAIL_LINES) -> str:
    lines = [line for line in text.rstrip().splitlines() if not _NOISE.match(line)]
    return "\n".join(lines[-n:])


def _run(argv: list[str], workdir: Path, logfile: Path, *, timeout_s: float) -> tuple[int | None, float]:
    """Run argv in workdir with stdout+stderr into logfile; return (exit code or None on timeout, seconds)."""
    try:
        done = run_tool(argv, timeout_s=timeout_s, cwd=workdir, env=_env(), log_file=logfile)
    except OSError as exc:
        raise ConversionError(f"cannot start onnx2tf ({exc}); argv: {' '.join(argv)}") from exc
    return done.rc, done.seconds


def _read_log(logfile: Path) -> str:
    try:
        return _ANSI.sub("", logfile.read_text(errors="replace"))
    except OSError:
        return ""


def _prepare(workdir: Path, onnx: OnnxExport, spec: ModelSpec, calibration: ImageSet | None) -> None:
    shutil.copyfile(onnx.path, workdir / "model.onnx")
    sample = np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32)
    np.save(workdir / _SAMPLE_NAME, sample)
    if calibration is not None:
        np.save(workdir / "calib.npy", calibration.images.astype(np.float32) / np.float32(255.0))


def describe_tflite(precision: str, path: Path) -> TfliteFile:
    """The TfliteFile record of an existing .tflite file (e.g. one converted by an earlier run).

    Raises VerificationError when the file is missing, cannot be loaded or is not single-input/output.
    """
    from pipeline.tflite import tflite_io_details

    path = Path(path)
    details = tflite_io_details(path)
    if len(details["inputs"]) != 1 or len(details["outputs"]) != 1:
        raise VerificationError(
            f"{path}: expected one input and one output, got {len(details['inputs'])} and {len(details['outputs'])}"
        )
    inp, out = details["inputs"][0], details["outputs"][0]
    return TfliteFile(
        precision=precision,
        path=path,
        size_bytes=details["size_bytes"],
        input_dtype=inp["dtype"],
        input_shape=tuple(inp["shape"]),
        output_dtype=out["dtype"],
        output_shape=tuple(out["shape"]),
        input_quantization=inp["quantization"],
        output_quantization=out["quantization"],
    )


def _check_args(precisions: Sequence[str], spec: ModelSpec, calibration: ImageSet | None, int8_io: str) -> None:
    unknown = [p for p in precisions if p not in PRECISIONS]
    if not precisions or unknown or len(set(precisions)) != len(precisions):
        raise UsageError(f"precisions must be distinct values of {PRECISIONS}, got {list(precisions)}")
    if int8_io not in ("int8", "uint8", "float32"):
        raise UsageError(f"int8_io must be int8, uint8 or float32, got {int8_io!r}")
    if len(spec.mean) != spec.input_shape[0] or len(spec.std) != spec.input_shape[0]:
        raise UsageError(f"{spec.name}: mean/std need {spec.input_shape[0]} values (one per channel)")
    if "int8" in precisions:
        if calibration is None or len(calibration) == 0:
            raise DatasetError("int8 conversion needs calibration images; pass a calibration ImageSet")
        spec.check_images(calibration)


def convert_tflite(
    onnx: OnnxExport,
    spec: ModelSpec,
    out_dir: Path,
    *,
    precisions: Sequence[Precision],
    calibration: ImageSet | None,
    int8_io: Literal["int8", "uint8", "float32"] = "int8",
    quant_type: Literal["per-channel", "per-tensor"] = "per-channel",
    timeout_s: float = 900,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
    saved_model_dir: Path | None = None,
) -> dict[str, TfliteFile]:
    """Run onnx2tf once for all `precisions`; return {precision: TfliteFile} for model_<precision>.tflite.

    With `saved_model_dir`, the TensorFlow SavedModel onnx2tf converted from is kept there (for the
    selective-quantization remedy, pipeline/quantize/tfconv.py, which re-quantizes it with some ops float).

    `extra_args` are further onnx2tf options (e.g. `-rtpo LeakyReLU` for the Edge TPU: see
    pipeline/edgetpu/fixes.py). Raises ConversionError (with onnx2tf's last lines and argv) when it fails, times
    out, or does not emit a requested file with the expected I/O types.
    """
    _check_args(precisions, spec, calibration, int8_io)
    if not Path(onnx.path).is_file():
        raise ConversionError(f"{onnx.path}: ONNX file not found; run the export stage first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    int8 = "int8" in precisions
    argv = _argv(onnx, spec, int8=int8, int8_io=int8_io, quant_type=quant_type, extra=extra_args)
    workdir = Path(tempfile.mkdtemp(prefix=".onnx2tf-", dir=out_dir))
    logfile = workdir / "onnx2tf.log"
    try:
        _prepare(workdir, onnx, spec, calibration if int8 else None)
        log.info("%s: onnx2tf %s (%s)", spec.name, "+".join(precisions), " ".join(argv[1:]))
        rc, seconds = _run(argv, workdir, logfile, timeout_s=timeout_s)
        text = _read_log(logfile)
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(log_path), text)
        cmd = " ".join(argv)
        if rc is None:
            raise ConversionError(
                f"{onnx.path}: onnx2tf timed out after {timeout_s:g} s; raise timeout_s or simplify the model.\n"
                f"argv: {cmd}\n--- last lines of onnx2tf output ---\n{_tail(text)}"
            )
        if rc != 0:
            raise ConversionError(
                f"{onnx.path}: onnx2tf failed with exit code {rc}.\n"
                f"argv: {cmd}\n--- last lines of onnx2tf output ---\n{_tail(text)}"
            )
        log.info("%s: onnx2tf finished in %.1f s", spec.name, seconds)
        staged: dict[str, TfliteFile] = {}
        for precision in precisions:
            src = workdir / "out" / _emitted_name(precision, int8_io)
            if not src.is_file():
                raise ConversionError(
                    f"{onnx.path}: onnx2tf exited 0 but did not write {src.name} for {precision}.\n"
                    f"argv: {cmd}\n--- last lines of onnx2tf output ---\n{_tail(text)}"
                )
            try:
                staged[precision] = describe_tflite(precision, src)
            except VerificationError as exc:
                raise ConversionError(f"onnx2tf wrote an unusable {precision} model: {exc}") from exc
            _check_io(staged[precision], spec, int8_io=int8_io)
        result: dict[str, TfliteFile] = {}
        for precision, rec in staged.items():
            final = out_dir / tflite_name(precision)
            os.replace(rec.path, final)
            result[precision] = replace(rec, path=final)
            log.info("%s: %s -> %s (%d bytes)", spec.name, precision, final, rec.size_bytes)
        if saved_model_dir is not None:
            _keep_saved_model(workdir / "out", Path(saved_model_dir))
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _keep_saved_model(src: Path, dest: Path) -> None:
    if not (src / "saved_model.pb").is_file():
        raise ConversionError(f"onnx2tf wrote no saved_model.pb in {src}; cannot keep the SavedModel")
    for f in src.glob("*.tflite"):
        f.unlink()
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(src), str(dest))


def _check_io(rec: TfliteFile, spec: ModelSpec, *, int8_io: str) -> None:
    c, h, w = spec.input_shape
    if rec.input_shape != (1, h, w, c):
        raise ConversionError(f"{rec.path.name}: input shape {rec.input_shape}, expected NHWC {(1, h, w, c)}")
    want = int8_io if rec.precision == "int8" else "float32"
    if rec.input_dtype != want or rec.output_dtype != want:
        raise ConversionError(
            f"{rec.path.name}: {rec.precision} I/O is {rec.input_dtype} -> {rec.output_dtype}, expected {want}"
        )
    if want in ("int8", "uint8") and (rec.input_quantization is None or rec.output_quantization is None):
        raise ConversionError(f"{rec.path.name}: {want} I/O without scale/zero point")


def tflite_name(precision: str) -> str:
    """The file name of a converted model of `precision` (in a convert stage's folder and the bundle)."""
    return f"model_{precision}.tflite"
