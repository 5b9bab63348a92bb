"""Export -> onnx2tf -> verify on a tiny residual CNN trained briefly on real Fashion-MNIST images.

Real tools throughout: torch.onnx, onnxruntime, onnx2tf (as a subprocess), ai-edge-litert. onnx2tf runs
twice in this file: once for fp32+fp16+int8 (module fixture), once on a corrupt ONNX file.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import SPEC, TinyResidualCNN, has_fashion_mnist, read_fashion_mnist, train_tiny
from torch import nn

from pipeline.convert.convert_tflite import TfliteFile, convert_tflite, describe_tflite
from pipeline.convert.export_onnx import OnnxExport, export_onnx
from pipeline.data.imageset import ImageSet
from pipeline.errors import ConversionError, DatasetError, ExportError, UsageError, VerificationError
from pipeline.tflite import load_interpreter, run_batch, tflite_io_details, uses_xnnpack
from pipeline.verification import PrecisionParity, VerifyReport, check_parity, verify_tflite

log = logging.getLogger(__name__)

needs_fmnist = pytest.mark.skipif(not has_fashion_mnist(), reason="Fashion-MNIST missing in /usr/share/datasets")

N_TEST = 200


@pytest.fixture(scope="module")
def fmnist() -> tuple[ImageSet, ImageSet]:
    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing in /usr/share/datasets")
    return read_fashion_mnist("train", 1000), read_fashion_mnist("test", N_TEST)


@pytest.fixture(scope="module")
def trained(fmnist: tuple[ImageSet, ImageSet]) -> TinyResidualCNN:
    torch.set_num_threads(2)
    return train_tiny(fmnist[0], steps=60)


@pytest.fixture(scope="module")
def exported(trained: nn.Module, fmnist, tmp_path_factory: pytest.TempPathFactory) -> OnnxExport:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(trained, SPEC, out, check_images=fmnist[1].images[:8])


@pytest.fixture(scope="module")
def converted(exported: OnnxExport, fmnist, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TfliteFile]:
    out_dir = tmp_path_factory.mktemp("tflite")
    start = time.perf_counter()
    files = convert_tflite(
        exported,
        SPEC,
        out_dir,
        precisions=("fp32", "fp16", "int8"),
        calibration=fmnist[0].subset(200, seed=3),
        int8_io="int8",
        log_path=out_dir / "onnx2tf.log",
    )
    log.warning("onnx2tf fp32+fp16+int8 took %.1f s", time.perf_counter() - start)
    return files


@pytest.fixture(scope="module")
def report(converted, trained, fmnist) -> VerifyReport:
    rep = verify_tflite(converted, trained, SPEC, fmnist[1], threads=2)
    log.warning("parity: %s", json.dumps(rep.to_dict(), indent=1))
    return rep


# ---------------------------------------------------------------- export


@needs_fmnist
def test_export_matches_torch(exported: OnnxExport) -> None:
    import onnx

    assert exported.path.is_file() and exported.exporter == "torchscript"
    assert (exported.input_name, exported.output_name, exported.opset) == ("input", "logits", 18)
    assert exported.input_shape == (1, 1, 28, 28)
    assert exported.max_abs_diff < 1e-4
    assert [p.name for p in exported.path.parent.iterdir()] == ["model.onnx"]  # no temporary left behind
    graph = onnx.load(str(exported.path))
    assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)  # folded into the convs
    again = OnnxExport.from_path(exported.path)
    assert (again.input_name, again.output_name, again.input_shape, again.opset) == (
        "input",
        "logits",
        (1, 1, 28, 28),
        18,
    )


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_numbers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyResidualCNN().eval()
    res = export_onnx(model, SPEC, tmp_path / "d.onnx", exporter="dynamo")
    assert res.exporter == "dynamo" and res.max_abs_diff < 1e-5
    assert not (tmp_path / "d.onnx.data").exists()  # external_data=False: one self-contained file


class _Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 1).flatten(1) + torch.rand(1, 10)


class _Unexportable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x[0, 0]).real[:10].unsqueeze(0)


def test_export_disagreement_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"disagrees with PyTorch: max \|diff\|"):
        export_onnx(_Noisy(), SPEC, tmp_path / "noisy.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []  # nothing written under the final name, no temporary left


def test_unsupported_op_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"ONNX export failed.*torchscript.*eig"):
        export_onnx(_Unexportable(), SPEC, tmp_path / "eig.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- convert


@needs_fmnist
@pytest.mark.slow
def test_converted_files_and_io_types(converted: dict[str, TfliteFile]) -> None:
    assert set(converted) == {"fp32", "fp16", "int8"}
    out_dir = converted["fp32"].path.parent
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["model_fp16.tflite", "model_fp32.tflite", "model_int8.tflite", "onnx2tf.log"]
    assert "Float32 tflite output complete" in (out_dir / "onnx2tf.log").read_text()
    for prec, f in converted.items():
        assert f.path.name == f"model_{prec}.tflite" and f.size_bytes == f.path.stat().st_size > 0
        assert f.input_shape == (1, 28, 28, 1) and f.output_shape == (1, 10)
    fp32, fp16, int8 = converted["fp32"], converted["fp16"], converted["int8"]
    assert (fp32.input_dtype, fp32.output_dtype, fp32.input_quantization) == ("float32", "float32", None)
    assert (fp16.input_dtype, fp16.output_dtype) == ("float32", "float32")
    assert fp16.size_bytes < fp32.size_bytes
    assert (int8.input_dtype, int8.output_dtype) == ("int8", "int8")
    scale, zero_point = int8.input_quantization
    # input range of the normalized images: (0 - 0.286)/0.353 .. (1 - 0.286)/0.353 over 256 int8 steps
    assert scale == pytest.approx((1 / 0.3530) / 255, rel=0.05) and -128 <= zero_point <= 127
    assert int8.output_quantization is not None
    assert int8.size_bytes < fp16.size_bytes
    assert describe_tflite("int8", int8.path) == int8


@needs_fmnist
@pytest.mark.slow
def test_interpreter_wrapper(converted: dict[str, TfliteFile], fmnist) -> None:
    details = tflite_io_details(converted["int8"].path)
    assert details["inputs"][0]["dtype"] == "int8" and details["xnnpack"] is True
    assert details["signatures"]["serving_default"]["inputs"] == ["input"]
    interp = load_interpreter(converted["int8"].path, threads=2)
    assert uses_xnnpack(interp)
    x = SPEC.to_tensor(fmnist[1].images[:5]).permute(0, 2, 3, 1).numpy()
    logits = run_batch(interp, x)
    assert logits.dtype == np.float32 and logits.shape == (5, 10)
    with pytest.raises(VerificationError, match=r"model_int8.tflite: model input is \(1, 28, 28, 1\)"):
        run_batch(interp, x[:, :14])


@needs_fmnist
@pytest.mark.slow
def test_fp32_parity(report: VerifyReport) -> None:
    fp32 = report.record("fp32")
    assert report.n_images == N_TEST
    assert fp32.max_abs_diff < 1e-4 and fp32.agreement == 1.0
    assert fp32.accuracy == report.torch_accuracy
    assert fp32.xnnpack


@needs_fmnist
@pytest.mark.slow
def test_fp16_and_int8_parity(report: VerifyReport) -> None:
    fp16, int8 = report.record("fp16"), report.record("int8")
    assert report.torch_accuracy is not None and report.torch_accuracy > 0.5  # the model learned something
    assert fp16.agreement >= 0.98 and fp16.rel_max_abs_diff < 1e-2
    assert int8.agreement >= 0.9
    assert abs(int8.accuracy - report.torch_accuracy) <= 0.04
    check_parity(report)  # the default tolerances pass
    json.dumps(report.to_dict())
    assert [r["precision"] for r in report.to_dict()["precisions"]] == ["fp32", "fp16", "int8"]


@needs_fmnist
@pytest.mark.slow
def test_check_parity_names_the_numbers(report: VerifyReport) -> None:
    with pytest.raises(VerificationError, match=r"int8: top-1 agreement 0\.\d{4} < 1\.0000"):
        check_parity(report, min_agreement={"int8": 1.0}, max_abs_diff={})
    with pytest.raises(VerificationError, match=r"fp32: max \|logit diff\| .* > 1e-09"):
        check_parity(report, min_agreement={}, max_abs_diff={"fp32": 1e-9})


def test_check_parity_on_a_built_report() -> None:
    rec = PrecisionParity("int8", Path("m.tflite"), 10, 0.7, 0.85, 2.0, 0.3, 0.2, True)
    rep = VerifyReport("m", "x", 100, 2, 0.72, 10.0, (rec,))
    with pytest.raises(VerificationError, match=r"m: TFLite disagrees .*int8: top-1 agreement 0\.8500 < 0\.9000"):
        check_parity(rep)
    check_parity(rep, min_agreement={"int8": 0.8})
    assert rep.to_dict()["precisions"][0]["path"] == "m.tflite"


@needs_fmnist
def test_corrupt_onnx_is_a_conversion_error_with_the_tools_tail(exported: OnnxExport, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(exported.path.read_bytes()[:3000])
    record = OnnxExport(bad, "input", "logits", (1, 1, 28, 28), 18, 0.0, "torchscript")
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert_tflite(record, SPEC, out, precisions=("fp32",), calibration=None, log_path=tmp_path / "log.txt")
    msg = str(info.value)
    assert "exit code 1" in msg and "argv: " in msg and "-m onnx2tf" in msg
    assert "DecodeError" in msg  # onnx's own error, from the tail of onnx2tf's output
    assert list(out.iterdir()) == []  # no half files, no working directory left
    assert "DecodeError" in (tmp_path / "log.txt").read_text()


def test_convert_argument_errors(tmp_path: Path) -> None:
    record = OnnxExport(tmp_path / "m.onnx", "input", "logits", (1, 1, 28, 28), 18, 0.0, "torchscript")
    with pytest.raises(UsageError, match="precisions"):
        convert_tflite(record, SPEC, tmp_path, precisions=("fp64",), calibration=None)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="calibration"):
        convert_tflite(record, SPEC, tmp_path, precisions=("int8",), calibration=None)
    with pytest.raises(ConversionError, match="ONNX file not found"):
        convert_tflite(record, SPEC, tmp_path, precisions=("fp32",), calibration=None)


# ---------------------------------------------------------------- verify errors


@pytest.mark.parametrize("content", [None, b"not a flatbuffer at all"])
def test_verify_rejects_missing_or_corrupt_tflite(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model_fp32.tflite"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(VerificationError, match=r"model_fp32.tflite: (TFLite model not found|not a loadable)"):
        describe_tflite("fp32", path)
    f = TfliteFile("fp32", path, 0, "float32", (1, 28, 28, 1), "float32", (1, 10), None, None)
    data = ImageSet(np.zeros((3, 28, 28, 1), np.uint8), np.zeros(3, np.int64), SPEC.class_names, "zeros")
    torch.manual_seed(0)
    with pytest.raises(VerificationError, match=r"model_fp32.tflite"):
        verify_tflite({"fp32": f}, TinyResidualCNN().eval(), SPEC, data)


def test_no_tensorflow_in_the_parent_process() -> None:
    code = (
        "import sys, pipeline.convert.export_onnx, pipeline.convert.convert_tflite, pipeline.verification, "
        "pipeline.tflite; sys.exit('tensorflow' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
