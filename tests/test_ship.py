"""Shipping a bundle into Android (Gradle) and iOS (Xcode) app layouts.

The slow tests build a real bundle once: a tiny residual CNN trained briefly on real Fashion-MNIST, exported,
converted to full-integer int8 by onnx2tf, verified, and published by the bundle stage itself. The app side
then feeds the shipped model using nothing but the shipped metadata.json and labels.txt and must reproduce
the accuracy the bundle's manifest records. The fast tests cover refusals that happen before any model is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import CLASSES, SPEC, has_fashion_mnist, read_fashion_mnist, train_tiny

import pipeline.ship.copy as ship_copy
from pipeline.errors import ShipError
from pipeline.ship import ship
from pipeline.ship.copy import previous_dir, recover, staging_dir
from pipeline.ship.embed import (
    EDGESHIP_METADATA,
    TFLITE_METADATA,
    associated_files,
    metadata_entries,
    read_model_metadata,
)

N_TEST = 300
MODEL = "fmnist-tiny"


# ----------------------------------------------------------------------------------------- app layouts


def android_app(root: Path) -> Path:
    (root / "app" / "src" / "main").mkdir(parents=True)
    (root / "settings.gradle.kts").write_text('rootProject.name = "Demo"\ninclude(":app")\n')
    (root / "app" / "build.gradle.kts").write_text('plugins { id("com.android.application") }\n')
    return root


def ios_app(root: Path) -> Path:
    (root / "Demo.xcodeproj").mkdir(parents=True)
    (root / "Demo.xcodeproj" / "project.pbxproj").write_text("// !$*UTF8*$!\n{}\n")
    (root / "Demo").mkdir()
    (root / "Demo" / "DemoApp.swift").write_text("import SwiftUI\n")
    return root


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (hidden ones too)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------- a real bundle


@pytest.fixture(scope="module")
def fmnist():
    if not has_fashion_mnist():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    return read_fashion_mnist("train", 1000), read_fashion_mnist("test", N_TEST)


@pytest.fixture(scope="module")
def bundle(fmnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """artifacts/<target>/ as the deploy publishes it, for an int8 model with int8 input and output."""
    from pipeline.bundle import publish_bundle
    from pipeline.convert.convert_tflite import convert_tflite
    from pipeline.convert.export_onnx import export_onnx
    from pipeline.verification import verify_tflite

    train, test = fmnist
    torch.set_num_threads(2)
    model = train_tiny(train, steps=60)
    work = tmp_path_factory.mktemp("bundle_work")
    onnx = export_onnx(model, SPEC, work / "model.onnx", check_images=test.images[:8])
    files = convert_tflite(
        onnx, SPEC, work, precisions=("int8",), calibration=train.subset(200, seed=3), int8_io="int8",
        log_path=work / "onnx2tf.log",
    )  # fmt: skip
    rec = files["int8"]
    parity = verify_tflite(files, model, SPEC, test, threads=2).precisions[0]
    summary = {
        "target": "android",
        "model": SPEC.name,
        "shipped_precision": "int8",
        "test_images": len(test),
        "data": {"test": test.source},
        "variants": {"int8": {"accuracy": parity.accuracy, "size_bytes": rec.size_bytes}},
    }
    (work / "report.md").write_text("# report\n")
    return publish_bundle(tmp_path_factory.mktemp("artifacts") / "android", summary, files, spec=SPEC,
                          report_dir=work)  # fmt: skip


def predict_with_shipped_metadata(folder: Path, images: np.ndarray) -> list[str]:
    """What an app does: normalize, quantize, run, dequantize, argmax, look up the label; all from the folder."""
    from ai_edge_litert.interpreter import Interpreter

    meta = json.loads((folder / "metadata.json").read_text())
    labels = (folder / "labels.txt").read_text().splitlines()
    interp = Interpreter(model_path=str(folder / "model.tflite"))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    assert meta["layout"] == "NHWC" and list(inp["shape"]) == meta["input"]["shape"]
    norm, qin, qout = meta["normalization"], meta["input"]["quantization"], meta["output"]["quantization"]
    dtype = np.dtype(meta["input"]["dtype"])
    names = []
    for img in images:
        x = (img.astype(np.float32) / 255.0 - np.float32(norm["mean"])) / np.float32(norm["std"])
        if qin is not None:
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / qin["scale"] + qin["zero_point"]), info.min, info.max)
        interp.set_tensor(inp["index"], x.astype(dtype)[None])
        interp.invoke()
        y = interp.get_tensor(out["index"])[0].astype(np.float32)
        if qout is not None:
            y = (y - qout["zero_point"]) * qout["scale"]
        names.append(labels[int(np.argmax(y))])
    return names


# ----------------------------------------------------------------------------------------- shipping


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["android", "ios"])
def test_shipped_model_reproduces_the_bundle_accuracy_from_its_metadata_alone(
    kind: str, bundle: Path, fmnist, tmp_path: Path
) -> None:
    app = android_app(tmp_path / "app") if kind == "android" else ios_app(tmp_path / "app")
    result = ship(bundle, app, model_name=MODEL)
    expected = (
        app / "app" / "src" / "main" / "assets" / MODEL if kind == "android" else app / "Demo" / "Resources" / MODEL
    )
    assert result.app_kind == kind and result.destination == expected.resolve()
    assert sorted(p.name for p in expected.iterdir()) == [
        "labels.txt",
        "manifest.json",
        "metadata.json",
        "model.tflite",
    ]
    assert [p.name for p in expected.parent.iterdir()] == [MODEL]  # no staging or previous folder left

    meta = json.loads((expected / "metadata.json").read_text())
    manifest = json.loads((expected / "manifest.json").read_text())
    recorded = json.loads((bundle / "manifest.json").read_text())["summary"]["variants"]["int8"]["accuracy"]
    assert meta["accuracy"]["value"] == recorded == manifest["bundle"]["summary"]["variants"]["int8"]["accuracy"]
    assert meta["sha256"] == hashlib.sha256((expected / "model.tflite").read_bytes()).hexdigest()
    assert meta["input"]["dtype"] == "int8" and meta["input"]["quantization"]["scale"] > 0
    assert meta["class_names"] == list(CLASSES) and meta["target"] == "android" and meta["version"] == result.version
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((expected / name).read_bytes()).hexdigest() == entry["sha256"]

    test = fmnist[1]
    predicted = predict_with_shipped_metadata(expected, test.images)
    accuracy = float(np.mean([p == CLASSES[y] for p, y in zip(predicted, test.labels, strict=True)]))
    assert abs(accuracy - recorded) <= 1 / len(test), (accuracy, recorded)
    assert accuracy > 0.5  # a trained model, not chance


@pytest.mark.slow
def test_embedded_metadata_is_readable_and_the_model_computes_the_same(bundle: Path, tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    app = android_app(tmp_path / "app")
    dest = ship(bundle, app, model_name=MODEL).destination
    shipped = (dest / "model.tflite").read_bytes()
    original = (bundle / "model.tflite").read_bytes()
    entries = metadata_entries(shipped)
    assert {TFLITE_METADATA, EDGESHIP_METADATA} <= set(entries)
    md = read_model_metadata(entries[TFLITE_METADATA])
    meta = json.loads((dest / "metadata.json").read_text())
    assert md["version"] == meta["version"] and md["min_parser_version"] == "1.0.0"
    (inp,) = md["inputs"]
    assert inp["color_space"] == "GRAYSCALE" and inp["size"] == [28, 28]
    assert inp["mean"] == pytest.approx([255 * m for m in SPEC.mean], rel=1e-6)
    assert inp["std"] == pytest.approx([255 * s for s in SPEC.std], rel=1e-6)
    assert md["outputs"][0]["associated_files"] == [{"name": "labels.txt", "type": 2}]  # TENSOR_AXIS_LABELS
    assert associated_files(shipped) == {"labels.txt": (dest / "labels.txt").read_bytes()}
    embedded = json.loads(entries[EDGESHIP_METADATA])
    assert embedded == {k: v for k, v in meta.items() if k not in ("sha256", "embedded")}

    rng = np.random.default_rng(1)
    xs = [rng.integers(-128, 127, size=(1, 28, 28, 1), dtype=np.int8) for _ in range(5)]
    outs = []
    for model in (original, shipped):
        interp = Interpreter(model_content=model)
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0], interp.get_output_details()[0]
        ys = []
        for x in xs:
            interp.set_tensor(i["index"], x)
            interp.invoke()
            ys.append(interp.get_tensor(o["index"]).copy())
        outs.append(np.stack(ys))
    assert np.array_equal(outs[0], outs[1])


TFLITE_SUPPORT = "tflite-support==0.4.4"
# The official reader, apart from the pinned stack: its own folder on PYTHONPATH, in a child process. (Only the
# metadata reader is imported: `import tflite_support` also loads its Task Library protos, which need protobuf < 4.)
READ_WITH_TFLITE_SUPPORT = """
import json, sys
from tensorflow_lite_support.metadata.python import metadata
shown = metadata.MetadataDisplayer.with_model_file(sys.argv[1])
print("EDGESHIP_TFLS " + json.dumps({
    "from": metadata.__file__, "metadata": json.loads(shown.get_metadata_json()),
    "packed": shown.get_packed_associated_file_list(),
    "labels": shown.get_associated_file_buffer("labels.txt").decode("utf-8"),
}))
"""


def _tflite_support_dir() -> Path:
    """tflite-support installed with --no-deps into a folder of its own (it wants protobuf < 4, which the pinned
    stack cannot have), once per machine: $EDGESHIP_TFLITE_SUPPORT, else /var/cache/edgeship-tflite-support as
    root, else ~/.cache/edgeship/tflite-support. Skips, with pip's words, when it cannot be installed."""
    default = "/var/cache/edgeship-tflite-support" if os.geteuid() == 0 else "~/.cache/edgeship/tflite-support"
    dest = Path(os.environ.get("EDGESHIP_TFLITE_SUPPORT", default)).expanduser()
    if (dest / ".edgeship").is_file() and (dest / ".edgeship").read_text() == TFLITE_SUPPORT:
        return dest
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--only-binary=:all:", "--target", str(tmp), TFLITE_SUPPORT],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"cannot pip install {TFLITE_SUPPORT} for the cross-check: {proc.stderr.strip()[-500:]}")
    (tmp / ".edgeship").write_text(TFLITE_SUPPORT)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@pytest.mark.slow
def test_official_tflite_support_reads_the_metadata(bundle: Path, tmp_path: Path) -> None:
    dest = ship(bundle, android_app(tmp_path / "app"), model_name=MODEL).destination
    where = _tflite_support_dir()
    proc = subprocess.run(
        [sys.executable, "-c", READ_WITH_TFLITE_SUPPORT, str(dest / "model.tflite")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(where)},
    )  # fmt: skip
    if "libusb-1.0.so.0" in proc.stderr:  # its metadata extension links libusb
        pytest.skip("tflite-support needs libusb-1.0.so.0: apt-get install libusb-1.0-0 (.ci/setup_devices.sh)")
    line = next((s for s in proc.stdout.splitlines() if s.startswith("EDGESHIP_TFLS ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[len("EDGESHIP_TFLS ") :])
    assert out["from"].startswith(str(where))  # the official package, not something else on the path
    parsed = out["metadata"]
    tensor = parsed["subgraph_metadata"][0]["input_tensor_metadata"][0]
    unit = tensor["process_units"][0]
    assert unit["options_type"] == "NormalizationOptions"
    assert unit["options"]["mean"] == pytest.approx([255 * SPEC.mean[0]], rel=1e-5)
    assert unit["options"]["std"] == pytest.approx([255 * SPEC.std[0]], rel=1e-5)
    assert tensor["content"]["content_properties_type"] == "ImageProperties"
    output = parsed["subgraph_metadata"][0]["output_tensor_metadata"][0]
    assert [(f["name"], f["type"]) for f in output["associated_files"]] == [("labels.txt", "TENSOR_AXIS_LABELS")]
    assert out["packed"] == ["labels.txt"]
    assert out["labels"] == (dest / "labels.txt").read_text() and out["labels"].splitlines() == list(CLASSES)


@pytest.mark.slow
def test_custom_resources_folder_and_a_symlink_that_stays_inside(bundle: Path, tmp_path: Path) -> None:
    app = ios_app(tmp_path / "app")
    (app / "Demo" / "Models").mkdir()
    (app / "Demo" / "Link").symlink_to(app / "Demo" / "Models")
    result = ship(bundle, app, model_name=MODEL, resources=Path("Demo/Link"))
    assert result.destination == (app / "Demo" / "Models" / MODEL).resolve()
    assert (app / "Demo" / "Models" / MODEL / "model.tflite").is_file()


# ----------------------------------------------------------------------------------------- atomicity


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raise on the second file", "truncated file", "interrupt", "second rename"])
def test_a_failed_ship_leaves_the_previous_model(
    failure: str, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = android_app(tmp_path / "app")
    first = ship(bundle, app, model_name=MODEL, version="1.0.0")
    before = tree(first.destination)
    written: list[str] = []
    real_write = ship_copy.write_file

    def failing_write(path: Path, data: bytes) -> None:
        written.append(path.name)
        if failure == "raise on the second file" and len(written) == 2:
            real_write(path, data[: len(data) // 3])
            raise OSError(28, "No space left on device")
        if failure == "truncated file" and path.name == "model.tflite":
            return real_write(path, data[:-100])
        if failure == "interrupt" and len(written) == 3:
            raise KeyboardInterrupt
        return real_write(path, data)

    monkeypatch.setattr(ship_copy, "write_file", failing_write)
    if failure == "second rename":  # the two-rename path, failing after the old folder moved aside
        monkeypatch.setattr(ship_copy, "_exchange", lambda a, b: False)
        real_replace = os.replace

        def replace(src, dst):
            if Path(src).name.endswith(".shipping"):
                raise OSError(5, "Input/output error")
            return real_replace(src, dst)

        monkeypatch.setattr(ship_copy.os, "replace", replace)
    expected_error = {"truncated file": ShipError, "interrupt": KeyboardInterrupt}.get(failure, OSError)
    with pytest.raises(expected_error):
        ship(bundle, app, model_name=MODEL, version="1.1.0")
    assert tree(first.destination) == before
    assert json.loads((first.destination / "metadata.json").read_text())["version"] == "1.0.0"
    assert sorted(p.name for p in first.destination.parent.iterdir()) == [MODEL]
    monkeypatch.undo()
    assert ship(bundle, app, model_name=MODEL, version="1.1.0").replaced_version == "1.0.0"


def test_a_run_killed_between_renames_is_repaired(tmp_path: Path) -> None:
    dest = tmp_path / "assets" / "m"
    prev, stage = previous_dir(dest), staging_dir(dest)
    prev.mkdir(parents=True)
    (prev / "model.tflite").write_bytes(b"old")
    stage.mkdir()
    (stage / "model.tflite").write_bytes(b"half")
    recover(dest)
    assert (dest / "model.tflite").read_bytes() == b"old" and not prev.exists() and not stage.exists()


@pytest.mark.slow
def test_the_exchange_keeps_the_folder_present(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after the swap, before the old copy is removed, the destination holds the new model, whole."""
    app = android_app(tmp_path / "app")
    dest = ship(bundle, app, model_name=MODEL, version="1.0.0").destination
    seen = {}
    real_rmtree = ship_copy.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name.endswith((".shipping", ".previous")) and Path(path).exists():
            seen["version"] = json.loads((dest / "metadata.json").read_text())["version"]
            seen["old"] = json.loads((Path(path) / "metadata.json").read_text())["version"]
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ship_copy.shutil, "rmtree", rmtree)
    ship(bundle, app, model_name=MODEL, version="1.0.1")
    assert seen == {"version": "1.0.1", "old": "1.0.0"}


# ----------------------------------------------------------------------------------------- versions


def fake_bundle(folder: Path) -> Path:
    """A bundle whose files match its manifest; its model is not a model (refusals come before it is read)."""
    folder.mkdir(parents=True)
    files = {"model.tflite": b"not a model", "labels.txt": b"a\nb\n", "metadata.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    manifest = {
        "format": "edgeship-bundle/1",
        "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in files.items()},
        "summary": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def installed(app: Path, version: str) -> Path:
    dest = app / "app" / "src" / "main" / "assets" / MODEL
    dest.mkdir(parents=True)
    (dest / "metadata.json").write_text(json.dumps({"version": version}))
    return dest


@pytest.mark.parametrize(
    ("there", "new", "message"),
    [
        ("2.0.0", "1.9.9", "newer than this bundle's 1.9.9"),
        ("2030-01-01T00:00:00Z", "2029-12-31T23:59:59Z", "newer than this bundle"),
        ("1.0.0", "2030-01-01T00:00:00Z", "cannot be ordered"),
    ],
)
def test_a_newer_model_in_the_app_is_not_replaced(tmp_path: Path, there: str, new: str, message: str) -> None:
    app = android_app(tmp_path / "app")
    dest = installed(app, there)
    with pytest.raises(ShipError, match=message):
        ship(fake_bundle(tmp_path / "b"), app, model_name=MODEL, version=new)
    assert json.loads((dest / "metadata.json").read_text()) == {"version": there}


def test_the_default_version_is_the_bundle_build_time(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "b")
    os.utime(bundle / "manifest.json", (1_700_000_000, 1_700_000_000))
    app = android_app(tmp_path / "app")
    installed(app, "2023-11-14T22:13:21Z")  # one second after the bundle
    with pytest.raises(
        ShipError, match="holds version 2023-11-14T22:13:21Z, newer than this bundle's 2023-11-14T22:13:20Z"
    ):
        ship(bundle, app, model_name=MODEL)


@pytest.mark.slow
def test_force_replaces_a_newer_model(bundle: Path, tmp_path: Path) -> None:
    app = android_app(tmp_path / "app")
    ship(bundle, app, model_name=MODEL, version="9.0.0")
    result = ship(bundle, app, model_name=MODEL, version="1.0.0", force=True)
    assert result.replaced_version == "9.0.0"
    assert json.loads((result.destination / "metadata.json").read_text())["version"] == "1.0.0"


def test_a_bundle_changed_after_publishing_is_refused(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "b")
    (bundle / "labels.txt").write_bytes(b"tampered\n")
    with pytest.raises(ShipError, match="does not match its sha256"):
        ship(bundle, android_app(tmp_path / "app"), model_name=MODEL)


# ----------------------------------------------------------------------------------------- where it may go


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "..", ".hidden", "", "x" * 65, "a\x00b"])
def test_model_names_with_separators_or_dots_are_refused(tmp_path: Path, name: str) -> None:
    app = android_app(tmp_path / "app")
    with pytest.raises(ShipError, match="not a plain folder name"):
        ship(fake_bundle(tmp_path / "b"), app, model_name=name)
    assert not (app / "app" / "src" / "main" / "assets").exists()


def test_a_symlinked_assets_folder_pointing_out_is_refused(tmp_path: Path) -> None:
    app = android_app(tmp_path / "app")
    outside = tmp_path / "outside"
    outside.mkdir()
    (app / "app" / "src" / "main" / "assets").symlink_to(outside)
    with pytest.raises(ShipError, match="outside the app folder"):
        ship(fake_bundle(tmp_path / "b"), app, model_name=MODEL)
    assert list(outside.iterdir()) == []


def test_a_symlinked_model_folder_pointing_out_is_refused(tmp_path: Path) -> None:
    app = android_app(tmp_path / "app")
    outside = tmp_path / "outside"
    outside.mkdir()
    (app / "app" / "src" / "main" / "assets").mkdir()
    (app / "app" / "src" / "main" / "assets" / MODEL).symlink_to(outside)
    with pytest.raises(ShipError, match="outside the app folder"):
        ship(fake_bundle(tmp_path / "b"), app, model_name=MODEL)
    assert list(outside.iterdir()) == []


def test_a_resources_folder_with_dotdot_is_refused(tmp_path: Path) -> None:
    app = ios_app(tmp_path / "app")
    with pytest.raises(ShipError, match="outside the app folder"):
        ship(fake_bundle(tmp_path / "b"), app, model_name=MODEL, resources=Path("Demo/../../elsewhere"))
    assert not (tmp_path / "elsewhere").exists()


def test_an_unknown_app_says_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "package.json").write_text("{}")
    with pytest.raises(ShipError, match=r"settings\.gradle.*\*\.xcodeproj"):
        ship(fake_bundle(tmp_path / "b"), tmp_path / "web", model_name=MODEL)


def test_an_xcode_project_without_its_app_folder_asks_for_the_resources_folder(tmp_path: Path) -> None:
    app = ios_app(tmp_path / "app")
    (app / "Demo" / "DemoApp.swift").unlink()
    (app / "Demo").rmdir()
    with pytest.raises(ShipError, match="name the resources folder"):
        ship(fake_bundle(tmp_path / "b"), app, model_name=MODEL)


@pytest.mark.parametrize(
    ("model", "folder"),
    [("fmnist_cnn", "fmnist_cnn"), ("mypkg.nets:make_net", "mypkg.nets-make_net"), ("../../x", "x"), ("::", "model")],
)
def test_the_default_model_name_is_a_plain_folder_name(tmp_path: Path, model: str, folder: str) -> None:
    from pipeline.ship import default_model_name

    (tmp_path / "metadata.json").write_text(json.dumps({"model": model}))
    assert default_model_name(tmp_path) == folder


# ------------------------------------------------------------------------ one metadata schema, both sides

# Every field the README's Kotlin and Swift loaders read, as a path into metadata.json.
LOADER_PATHS = (
    "input.shape", "input.dtype", "input.quantization.scale", "input.quantization.zero_point", "output.dtype",
    "output.quantization.scale", "output.quantization.zero_point", "normalization.mean", "normalization.std",
    "class_names", "version",
)  # fmt: skip


def _readme_loader_keys() -> set[str]:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    kotlin = readme[readme.index("```kotlin") : readme.index("```", readme.index("```kotlin") + 3)]
    swift = readme[readme.index("```swift") : readme.index("```", readme.index("```swift") + 3)]
    keys = set(re.findall(r'(?:get|opt)(?:JSONObject|JSONArray|String|Double|Int)\("(\w+)"\)', kotlin))
    decodable = swift[swift.index("struct EdgeshipMetadata") : swift.index("final class")]
    keys |= set(re.findall(r"let (\w+):", decodable))
    return keys


def _get(meta: dict, path: str):
    for part in path.split("."):
        meta = meta[part]
    return meta


def test_the_readme_loaders_read_only_fields_this_list_names() -> None:
    named = {part for path in LOADER_PATHS for part in path.split(".")}
    assert _readme_loader_keys() == named


@pytest.mark.slow
def test_bundle_and_app_metadata_share_one_schema_with_every_loader_field(bundle: Path, tmp_path: Path) -> None:
    dest = ship(bundle, android_app(tmp_path / "app"), model_name=MODEL).destination
    in_bundle = json.loads((bundle / "metadata.json").read_text())
    in_app = json.loads((dest / "metadata.json").read_text())
    for meta in (in_bundle, in_app):
        assert meta["format"] == "edgeship-metadata/2" and meta["schema_version"] == 2
        for path in LOADER_PATHS:
            _get(meta, path)  # KeyError names a field a loader reads and the file lacks
        assert isinstance(meta["input"]["quantization"], dict) and "mean" not in meta
    same = set(in_bundle) - {"version"}
    assert {k: in_bundle[k] for k in same} == {k: in_app[k] for k in same}
    assert set(in_app) - set(in_bundle) == {"bundle_sha256", "sha256", "embedded"}


@pytest.mark.slow
def test_a_board_bundle_shipped_into_a_phone_app_gets_a_note(bundle: Path, tmp_path: Path) -> None:
    from pipeline.ship import ship_target

    for target in ("rpi5", "android"):
        art = tmp_path / f"art-{target}"
        shutil.copytree(bundle, art / target)
        res = ship_target(target, android_app(tmp_path / f"app-{target}"), artifacts_dir=art, model_name=MODEL)
        if target == "rpi5":
            assert res.note and "not for a phone" in res.note and "TARGET=android" in res.note
        else:
            assert res.note is None
