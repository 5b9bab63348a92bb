"""Issue-17 hardening, as a user types it: labels that must match the model's outputs, input shapes, help
texts, a closed pipe, images resized or converted out loud, and device figures that a failed run keeps."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main

pytest_plugins = ("devices_fixtures",)

REPO = Path(__file__).resolve().parent.parent

FACTORY = "tests.conftest:tiny_resnet"  # 10 outputs, 1x28x28 input


def _folder(root: Path, classes: list[str], *, n: int = 2, shape: tuple[int, ...] = (28, 28)) -> Path:
    import cv2

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cv2.imwrite(str(root / split / c / f"{i}.png"), rng.integers(0, 255, shape, dtype=np.uint8))
    return root


def _deploy(tmp_path: Path, *extra: str) -> list[str]:
    return ["deploy", "--target", "host", "--model", FACTORY, "--input-shape", "1x28x28", "--mean", "0.5",
            "--std", "0.5", "--runs-dir", str(tmp_path / "runs"), "--artifacts-dir", str(tmp_path / "art"),
            *extra]  # fmt: skip


def test_a_folder_with_fewer_classes_than_outputs_is_refused_before_any_stage(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "data", ["a", "b", "c"])
    assert main(_deploy(tmp_path, "--data", str(data))) == 2
    err = capsys.readouterr().err
    assert "has 10 outputs but" in err and "names 3 classes (a, b, c)" in err and "--classes FILE" in err
    assert not (tmp_path / "runs" / "host").exists() or not list((tmp_path / "runs" / "host").glob("*/manifest.json"))
    assert not (tmp_path / "art").exists()


def test_a_one_class_data_set_is_refused(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "data", ["only"])
    assert main(_deploy(tmp_path, "--data", str(data))) == 2
    assert "names 1 class (only); a classifier needs at least 2" in capsys.readouterr().err


def test_a_classes_file_names_the_outputs_and_is_checked_too(tmp_path: Path, capsys) -> None:
    from pipeline.models.classes import check_classes, read_classes_file
    from pipeline.models.zoo import user_model_spec

    short = tmp_path / "short.txt"
    short.write_text("a\nb\nc\n")
    data = _folder(tmp_path / "data", ["a", "b", "c"])
    assert main(_deploy(tmp_path, "--data", str(data), "--classes", str(short))) == 2
    assert "make the file list the model's 10 classes in output order" in capsys.readouterr().err
    names = tmp_path / "names.txt"
    names.write_text("".join(f" class {i} \n\n" for i in range(10)))
    classes = read_classes_file(names)
    assert classes == tuple(f"class {i}" for i in range(10))
    spec = user_model_spec(FACTORY, input_shape=(1, 28, 28), mean=(0.5,), std=(0.5,), class_names=classes)
    check_classes(spec, where=str(names), from_file=True)  # 10 names for 10 outputs: accepted
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    assert main(_deploy(tmp_path, "--data", str(data), "--classes", str(dup))) == 2
    assert "names appear twice: a" in capsys.readouterr().err


def test_classes_for_a_built_in_model_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "c.txt").write_text("a\nb\n")
    assert main(["deploy", "--target", "host", "--classes", str(tmp_path / "c.txt")]) == 2
    assert "--classes is for your own model" in capsys.readouterr().err


@pytest.mark.parametrize("shape", ["0x32x32", "3x0x32", "3x32x-1", "9x32x32", "3x32"])
def test_bad_input_shapes_are_clean_usage_errors(shape: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", *_deploy(tmp_path, "--data", str(tmp_path))[:6],
                           "--input-shape", shape], capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "--input-shape" in proc.stderr


def test_images_resized_or_converted_are_counted_out_loud(tmp_path: Path, caplog) -> None:
    from pipeline.data.image_folder import load_image_folder

    data = _folder(tmp_path / "data", ["a", "b"], n=3, shape=(8, 8))
    with caplog.at_level(logging.WARNING):
        images = load_image_folder(data / "train", size=(32, 32), channels=3)
    assert images.images.shape == (6, 32, 32, 3)
    text = caplog.text
    assert "6 of 6 resized to 32x32" in text and "6 of 6 converted from grayscale to RGB" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_image_folder(data / "train", size=(8, 8), channels=1)
    assert caplog.text == ""  # nothing changed, nothing said


def test_one_mean_for_three_channels_is_said(caplog) -> None:
    from pipeline.models.zoo import user_model_spec

    with caplog.at_level(logging.WARNING):
        spec = user_model_spec(FACTORY, input_shape=(3, 28, 28), mean=(0.5,), std=(0.25,), class_names=("a", "b"))
    assert spec.mean == (0.5, 0.5, 0.5) and "one value given for a 3-channel input" in caplog.text


def test_help_names_every_target_and_every_option(capsys) -> None:
    import argparse

    from pipeline.cli import build_parser
    from pipeline.targets import available_targets

    assert "host-latency" in available_targets()
    for cmd in ("deploy", "profile", "ship", "report"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        if cmd != "report":
            assert all(name in out for name in available_targets()), (cmd, out)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, parser in sub.choices.items():
        silent = [a.dest for a in parser._actions if not a.help and a.dest != "help"]
        assert silent == [], (cmd, silent)


def test_a_closed_pipe_is_not_an_error() -> None:
    proc = subprocess.run(f"{sys.executable} -m pipeline targets | head -1", shell=True, capture_output=True,
                          text=True, cwd=REPO, timeout=120)  # fmt: skip  # the shell is the user's, on purpose
    assert proc.stdout.count("\n") == 1 and "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_failed_profile_run_keeps_every_earlier_device_figure(tmp_path: Path, tiny_tflite_file: Path) -> None:
    from pipeline.bench import BenchSettings
    from pipeline.devices import parse_devices
    from pipeline.devices.record import current_figures, profile_and_record, read_record
    from pipeline.errors import DevicesFailed
    from pipeline.targets import load_target

    record = tmp_path / "profile-devices.json"
    settings = BenchSettings(threads=1, warmup=1, runs=3)
    tr = load_target("host").transport
    files = {"model.tflite": tiny_tflite_file}
    runs = profile_and_record(files, settings, parse_devices("local", tr), record=record)
    assert runs["local"].ok
    first = read_record(record)["local"]
    assert first["results"]["model.tflite"]["latency_ms"]["p50"] > 0 and first["last_failure"] is None
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a model")
    with pytest.raises(DevicesFailed, match="Earlier figures of every device"):
        profile_and_record({"model.tflite": broken}, settings, parse_devices("local", tr), record=record)
    kept = read_record(record)["local"]
    assert kept["results"] == first["results"] and kept["measured_at"] == first["measured_at"]
    assert kept["last_failure"]["failed"]["model.tflite"]
    assert current_figures(record, files)["local"]["results"] == first["results"]
    assert current_figures(record, {"model.tflite": broken}) == {}  # figures are for the file they measured
    assert json.loads(record.read_text())["format"] == "edgeship-device-figures/1"


def test_labels_of_close_and_coincident_points_do_not_overlap() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from pipeline.report.figures import place_labels

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    pts = [(0.24, 89.43, "pruned fp32"), (0.24, 89.43, "pruned fp16"), (0.078, 89.46, "pruned int8 (shipped)"),
           (0.080, 90.2, "baseline int8"), (0.079, 89.5, "coral (int8)"), (0.0785, 89.48, "rpi5 (int8)")]  # fmt: skip
    for x, y, _ in pts:
        ax.scatter(x, y)
    ax.set_xlim(0, 0.3)
    ax.margins(y=0.25)
    boxes = place_labels(ax, pts)
    assert len(boxes) == 5  # fp32 and fp16 share one label: they are on the same spot
    texts = [t.get_text() for t in ax.texts]
    assert "pruned fp32 / pruned fp16" in texts or "pruned fp16 / pruned fp32" in texts
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_energy_measured_here_says_no_sensor_was_read_here() -> None:
    from pipeline.power.energy import energy_summary
    from pipeline.targets import load_target

    power = load_target("rpi5").power
    here = energy_summary(None, None, latency_ms=1.0, inferences=10, profile_power=power, sampled=False)
    assert "stands in for the" in here["method"] and "returned no power reading" not in here["method"]
    there = energy_summary(None, None, latency_ms=1.0, inferences=10, profile_power=power)
    assert "returned no power reading" in there["method"]


def test_an_interrupted_stage_leaves_no_temporary_folder(tmp_path: Path) -> None:
    from pipeline.runner import run_stage

    def work(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, "stage", work, inputs={}, config={})
    assert list(tmp_path.iterdir()) == []


def test_the_size_hint_does_not_offer_int8_when_int8_ships() -> None:
    from pipeline.deploy import budget_hint
    from pipeline.targets import load_target

    miss = [{"name": "size (KiB)"}]
    assert "ship int8" not in budget_hint(load_target("rpi5"), miss, {})
    fp16 = load_target("rpi5", overrides=("quantize.ship=fp16",))
    assert "or ship int8" in budget_hint(fp16, miss, {})


def test_make_report_shows_device_figures_recorded_for_the_current_bundle(tmp_path: Path) -> None:
    from pipeline.report.build import with_device_figures

    bundle = tmp_path / "art" / "rpi5"
    (bundle / "variants").mkdir(parents=True)
    (bundle / "model.tflite").write_bytes(b"current model")
    import hashlib

    def entry(data: bytes, p50: float) -> dict:
        return {"measured_at": "2026-12-01T10:00:00+00:00", "files": {"model.tflite": hashlib.sha256(data).hexdigest()},
                "info": {"machine": "aarch64"}, "failed": {}, "error": None, "last_failure": None,
                "results": {"model.tflite": {"latency_ms": {"p50": p50, "p99": 2 * p50}, "runtime": "litert",
                                             "runtime_version": "2.1.0"}}}  # fmt: skip

    record = {"format": "edgeship-device-figures/1",
              "devices": {"pi@a": entry(b"current model", 1.5), "pi@b": entry(b"an older model", 9.0)}}  # fmt: skip
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "profile-devices.json").write_text(json.dumps(record))
    summary = with_device_figures({"devices": None}, tmp_path / "run", bundle)
    assert list(summary["devices"]) == ["pi@a"]  # pi@b measured another model: not shown for this bundle
    assert summary["devices"]["pi@a"]["results"]["model.tflite"]["p50"] == 1.5
