"""Fault suite, models and data: missing, corrupt, foreign and hostile checkpoints; layers the pruner cannot
handle; an op onnx2tf cannot convert; missing or broken datasets and calibration sets.

Rows of docs/FAULTS.md ("Bad models", "Bad data"). Real torch.load, Torch-Pruning, onnx2tf, OpenCV, numpy.
"""

from __future__ import annotations

import builtins
import gzip
import os
import pickle
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data.calibration import load_calibration
from pipeline.data.fashion_mnist import load_fashion_mnist, read_idx
from pipeline.data.image_folder import load_image_folder
from pipeline.data.sources import DataPlan
from pipeline.errors import CheckpointError, ConversionError, DatasetError, PruningError
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.pruning.channels import prune_to_target
from pipeline.targets import TARGETS_DIR, load_target
from tests.conftest import tiny_resnet
from tests.tiny_models import SPEC, TinyResidualCNN, prune_cfg

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = torch.zeros(1, 1, 28, 28)
X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _tiny() -> TinyResidualCNN:
    torch.manual_seed(0)
    return TinyResidualCNN().eval()


@pytest.fixture
def good_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    save_checkpoint(_tiny(), path, meta={"model": "tiny"})
    return path


# ------------------------------------------------------------------ missing and corrupt checkpoints


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"none\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "none.pt", _tiny())
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(CheckpointError, match=r"dir\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "dir.pt", _tiny())


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.25, 0.5, 0.9, 0.999])
def test_truncated_checkpoint(tmp_path: Path, good_ckpt: Path, fraction: float) -> None:
    blob = good_ckpt.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(blob[: int(len(blob) * fraction)])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a readable PyTorch checkpoint, truncated or corrupt"):
        load_checkpoint(cut, _tiny())


@pytest.mark.parametrize("size", [1, 64, 4096, 200_000])
def test_random_bytes_checkpoint(tmp_path: Path, size: int) -> None:
    """Noise is refused as corrupt (bytes that happen to start like a pickle are refused by the weights-only
    unpickler: "not plain weights (corrupt, or a pickle that does more than store weights...)")."""
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(
        CheckpointError, match=r"noise\.pt: (not a readable PyTorch checkpoint|refused: .* \(corrupt, or)"
    ):
        load_checkpoint(path, _tiny())


def test_flipped_byte_in_the_weights_is_caught(tmp_path: Path, good_ckpt: Path) -> None:
    """torch.load does not check the zip's CRC-32s; before the fix a flipped weight byte loaded silently."""
    import zipfile

    with zipfile.ZipFile(good_ckpt) as zf:
        biggest = max(zf.infolist(), key=lambda i: i.file_size)  # the largest weight tensor
    blob = bytearray(good_ckpt.read_bytes())
    blob[biggest.header_offset + 30 + len(biggest.filename) + len(biggest.extra) + 100] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=rf"flipped\.pt: .*corrupt: record '{biggest.filename}' fails its CRC"):
        load_checkpoint(bad, _tiny())


@pytest.mark.parametrize(
    ("blob", "pattern"),
    [
        ([1, 2, 3], r"not a state_dict nor an edgeship checkpoint \(got list\)"),
        ({}, r"not a state_dict nor an edgeship checkpoint \(got dict\)"),
        ({"format": "edgeship-ckpt/1", "state_dict": [1]}, r"corrupt edgeship-ckpt/1 checkpoint"),
        ({"format": "edgeship-ckpt/1", "state_dict": {"w": torch.zeros(1)}, "meta": "x"}, r"corrupt edgeship-ckpt/1"),
        (
            {"format": "edgeship-ckpt/1", "state_dict": {"w": torch.zeros(1)}, "shapes": {"stem.0": 5}},
            r"another architecture: corrupt layer shape records",
        ),
        (
            {
                "format": "edgeship-ckpt/1",
                "state_dict": {"w": torch.zeros(1)},
                "shapes": {"stem.0": {"kind": "conv", "in_channels": 1, "out_channels": 16, "groups": 0}},
            },
            r"layer 'stem\.0': corrupt shape record \(groups=0\)",
        ),
        (
            {
                "format": "edgeship-ckpt/1",
                "state_dict": {"w": torch.zeros(1)},
                "shapes": {"stem.0": {"kind": "conv", "in_channels": 1, "out_channels": 10**12, "groups": 1}},
            },
            r"layer 'stem\.0': corrupt shape record \(out_channels=1000000000000\)",
        ),
    ],
    ids=["list", "empty-dict", "state-not-dict", "meta-not-dict", "shapes-not-dicts", "groups-0", "huge-channels"],
)
def test_well_formed_file_with_a_corrupt_structure(tmp_path: Path, blob: object, pattern: str) -> None:
    """Before the fix: KeyError / TypeError / ZeroDivisionError / a 4 TB allocation instead of CheckpointError."""
    path = tmp_path / "odd.pt"
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(path, _tiny())


# ------------------------------------------------------------------ another architecture


def test_edgeship_checkpoint_of_another_architecture_names_the_layer(tmp_path: Path) -> None:
    save_checkpoint(tiny_resnet(), tmp_path / "resnet.pt", meta={})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "resnet.pt", _tiny())
    msg = str(info.value)
    assert "resnet.pt: a checkpoint for another architecture: layer 'body.0' (conv) is not in this model" in msg


def test_state_dict_of_another_architecture_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    torch.save(tiny_resnet().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "sd.pt", _tiny())
    msg = str(info.value)
    assert "does not fit model TinyResidualCNN" in msg and "Pick the matching --model" in msg
    assert "missing: block.0.weight" in msg and "unexpected: body.0.weight" in msg


def test_same_architecture_other_width_names_the_shapes(tmp_path: Path) -> None:
    torch.save(TinyResidualCNN(width=8).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(CheckpointError, match=r"shape: stem\.0\.weight \(8, 1, 3, 3\) vs \(16, 1, 3, 3\)"):
        load_checkpoint(tmp_path / "narrow.pt", _tiny())
    torch.save(TinyResidualCNN(classes=5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(CheckpointError, match=r"shape: fc\.weight \(5, 32\) vs \(10, 32\), fc\.bias \(5,\) vs \(10,\)"):
        load_checkpoint(tmp_path / "five.pt", _tiny())


# ------------------------------------------------------------------ pickles that carry code


class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class _PopenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


_PAYLOADS = {"os.system": _SystemPayload, "exec": _ExecPayload, "Popen": _PopenPayload}


def _evil_files(tmp_path: Path, kind: str) -> tuple[Path, Path, Path]:
    """(torch zip checkpoint, raw pickle file, marker the payload would create) for one payload kind."""
    marker = tmp_path / f"pwned-{kind}"
    payload = _PAYLOADS[kind](marker)
    zipped = tmp_path / f"evil-{kind}.pt"
    torch.save({"conv.weight": torch.zeros(1), "extra": payload}, zipped)
    raw = tmp_path / f"evil-{kind}.pkl"
    raw.write_bytes(pickle.dumps({"conv.weight": torch.zeros(1), "extra": payload}, protocol=2))
    return zipped, raw, marker


@pytest.mark.parametrize("kind", sorted(_PAYLOADS))
def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path, kind: str) -> None:
    zipped, raw, marker = _evil_files(tmp_path, kind)
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match=rf"{path.name}: refused: the file is not plain weights, it asks to"):
            load_checkpoint(path, _tiny())
        assert not marker.exists(), f"the payload in {path.name} ran"


def _inst_pickle(marker: Path) -> bytes:
    """Protocol 0 with the INST opcode (`i`): `os.system("touch marker")` without a GLOBAL opcode."""
    return f"(S'touch {marker}'\nios\nsystem\n.".encode()


def test_protocol_0_inst_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned-inst"
    (tmp_path / "inst.pt").write_bytes(_inst_pickle(marker))
    with pytest.raises(
        CheckpointError,
        match=r"inst\.pt: refused: the file is not plain weights, \(corrupt, or a pickle that does more",
    ):
        load_checkpoint(tmp_path / "inst.pt", _tiny())
    assert not marker.exists()
    # control: plain pickle runs it
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())",
                    str(tmp_path / "inst.pt")], check=True, timeout=60)  # fmt: skip
    assert marker.exists()


def _appears(path: Path, timeout_s: float = 30.0) -> bool:
    """The Popen payload's `touch` runs on after the loading process has returned: wait for its file."""
    deadline = time.monotonic() + timeout_s
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


@pytest.mark.parametrize("kind", sorted(_PAYLOADS))
def test_the_refused_payload_is_live(tmp_path: Path, kind: str) -> None:
    """Control: the same files loaded WITHOUT weights_only do run their code (so the test above could fail),
    each payload, as a torch zip and as a raw pickle."""
    zipped, raw, marker = _evil_files(tmp_path, kind)
    for code in (
        f"import torch; torch.load({str(zipped)!r}, weights_only=False)",
        f"import pickle; pickle.load(open({str(raw)!r}, 'rb'))",
    ):
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
        assert _appears(marker), f"{kind}: {code} did not run the payload"
        assert marker.read_text() == ("pwned" if kind == "exec" else "")
        marker.unlink()


def test_cli_refuses_a_pickle_with_code_and_the_code_never_runs(tmp_path: Path) -> None:
    zipped, _, marker = _evil_files(tmp_path, "os.system")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "deploy", "--target", "host", "--checkpoint", str(zipped),
         "--runs-dir", str(tmp_path / "runs"), "--artifacts-dir", str(tmp_path / "art")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert f"edgeship: error: {zipped}: refused: the file is not plain weights" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "art").exists()


# ------------------------------------------------------------------ layers the pruner cannot handle


class SplitAct(nn.Module):
    """ReLU on the first half of the channels, sigmoid on the rest, with the channel count fixed at build time:
    Torch-Pruning cannot change `self.c`, so pruning the conv before it breaks the forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.c // 2, self.c - self.c // 2], dim=1)
        return torch.cat([torch.relu(a), torch.sigmoid(b)], 1)


class ChannelScale(nn.Module):
    """A learned per-channel scale kept as a raw (C, 1, 1) parameter: no nn layer type Torch-Pruning knows."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c).view(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class OddNet(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.odd = middle
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.odd(self.conv1(x))
        return self.fc(self.pool(torch.relu(self.conv2(x))).flatten(1))


def _odd(middle: type[nn.Module]) -> OddNet:
    torch.manual_seed(0)
    return OddNet(middle(16)).eval()


def test_layer_the_pruner_cannot_handle_is_a_pruning_error() -> None:
    with pytest.raises(PruningError) as info:
        prune_to_target(_odd(SplitAct), EXAMPLE, prune_cfg(metric="macs", keep=0.6, channel_multiple=4))
    msg = str(info.value)
    assert "split_with_sizes" in msg  # the underlying error, quoted
    assert "pruning.keep_layers" in msg and "pruning.enabled: false" in msg  # what to do


def test_layer_the_pruner_cannot_handle_is_named() -> None:
    with pytest.raises(PruningError) as info:
        prune_to_target(_odd(SplitAct), EXAMPLE, prune_cfg(metric="macs", keep=0.6, channel_multiple=4))
    msg = str(info.value)
    assert "'odd' (SplitAct)" in msg  # the layer that failed
    assert "'conv1'" in msg  # the layer to keep so that it gets the channels it expects


def test_keep_layers_from_a_profile_lets_the_model_through(tmp_path: Path) -> None:
    """The documented way out: keep the conv feeding the odd layer whole (pruning.keep_layers in the profile)."""
    text = (
        (TARGETS_DIR / "host.yaml")
        .read_text()
        .replace("  importance: l2\n", "  importance: l2\n  keep_layers: [conv1]\n")
    )
    (tmp_path / "keep.yaml").write_text(text)
    profile = load_target(str(tmp_path / "keep.yaml"))
    assert profile.pruning.keep_layers == ("conv1",)
    model = _odd(SplitAct)
    result = prune_to_target(
        model, EXAMPLE, prune_cfg(metric="macs", keep=0.6, channel_multiple=4, keep_layers=profile.pruning.keep_layers)
    )
    assert result.keep_achieved <= 0.6 and result.macs_after < result.macs_before
    pruned = result.model
    assert pruned.conv1.out_channels == 16 and pruned.conv2.out_channels < 32
    assert pruned(X).shape == (4, 10)


def test_custom_parameter_layer_is_pruned_and_its_checkpoint_loads(tmp_path: Path) -> None:
    """Torch-Pruning cuts a custom layer's raw (C,1,1) parameter with the channels it follows. Before the fix in
    checkpoint.py the pruned checkpoint saved but did not load ("shape: odd.scale (8, 1, 1) vs (16, 1, 1)")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Unwrapped parameters detected: ['odd.scale']"
        result = prune_to_target(_odd(ChannelScale), EXAMPLE, prune_cfg(metric="macs", keep=0.5, channel_multiple=4))
    pruned = result.model
    assert pruned.odd.scale.shape[0] == pruned.conv1.out_channels < 16
    save_checkpoint(pruned, tmp_path / "pruned.pt", meta={})
    loaded, _ = load_checkpoint(tmp_path / "pruned.pt", _odd(ChannelScale))
    assert loaded.odd.scale.shape == pruned.odd.scale.shape
    assert torch.equal(loaded(X), pruned(X))


# ------------------------------------------------------------------ an op onnx2tf cannot convert


def _castlike_onnx(path: Path) -> None:
    """A valid ONNX graph (checker and onnxruntime accept it) using CastLike, which onnx2tf 1.29 does not have."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("CastLike", ["flat", "flat"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "castlike",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


@pytest.mark.slow
def test_op_onnx2tf_cannot_convert_is_a_conversion_error_with_its_tail(tmp_path: Path) -> None:
    import onnxruntime as ort

    from pipeline.convert.convert_tflite import convert_tflite
    from pipeline.convert.export_onnx import OnnxExport

    _castlike_onnx(tmp_path / "castlike.onnx")
    session = ort.InferenceSession(str(tmp_path / "castlike.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.ones((1, 1, 28, 28), np.float32)})[0].tolist() == [[1.0]]
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        convert_tflite(
            OnnxExport.from_path(tmp_path / "castlike.onnx"), SPEC, out, precisions=("fp32",), calibration=None
        )
    msg = str(info.value)
    assert "castlike.onnx: onnx2tf failed with exit code 1" in msg
    assert "--- last lines of onnx2tf output ---" in msg
    assert "CastLike OP is not yet implemented" in msg  # onnx2tf's own words, from the tail of its output
    assert "No module named 'onnx2tf.ops.CastLike'" in msg
    assert list(out.iterdir()) == []  # no half-converted files, no working folder left


# ------------------------------------------------------------------ Fashion-MNIST missing or broken


def test_missing_fashion_mnist_says_how_to_install(tmp_path: Path) -> None:
    for split in ("train", "test"):
        with pytest.raises(DatasetError) as info:
            load_fashion_mnist(split, root=tmp_path / "no-such-dir")  # type: ignore[arg-type]
        msg = str(info.value)
        assert "Fashion-MNIST is not installed" in msg and "apt-get install dataset-fashion-mnist" in msg
        assert str(tmp_path / "no-such-dir") in msg


def _idx(path: Path, magic: int, dims: tuple[int, ...], body: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + body)
    return path


def test_half_installed_fashion_mnist_names_the_missing_file(tmp_path: Path) -> None:
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (2, 28, 28), bytes(2 * 784))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz: Fashion-MNIST is not installed; run `apt-get"):
        load_fashion_mnist("test", root=tmp_path)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"", r"truncated IDX header"),
        (b"\x1f\x8b\x08\x00garbage", r"corrupt gzip file"),
        (b"not gzip at all", r"corrupt gzip file"),
    ],
    ids=["empty", "bad-gzip", "not-gzip"],
)
def test_corrupt_fashion_mnist_file(tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    if content:
        path.write_bytes(content)
    else:
        with gzip.open(path, "wb"):
            pass
    with pytest.raises(DatasetError, match=pattern):
        read_idx(path, magic=0x803)


def test_fashion_mnist_images_and_labels_disagree(tmp_path: Path) -> None:
    _idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (3, 28, 28), bytes(3 * 784))
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (2,), bytes(2))
    with pytest.raises(DatasetError, match=r"test images \(3, 28, 28\) and labels \(2,\) do not match"):
        load_fashion_mnist("test", root=tmp_path)


# ------------------------------------------------------------------ calibration sets


def _plan(calibration: Path) -> DataPlan:
    return DataPlan(SPEC, calibration_path=calibration)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda p: p.write_bytes(b""), r"not a readable \.npz calibration set"),
        (lambda p: np.savez(p), r"the \.npz has no 'images' array"),
        (lambda p: np.savez(p, images=np.zeros((0, 28, 28), np.uint8)), r"expected a non-empty N,H,W\[,C\]"),
        (lambda p: np.savez(p, images=np.zeros((28, 28), np.uint8)), r"expected a non-empty N,H,W\[,C\]"),
        (lambda p: np.savez(p, images=np.zeros((4, 28, 28), np.float32)), r"must be uint8 pixels 0-255"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(100)), r"not a readable \.npz calibration set"),
        (lambda p: p.write_text("images,labels\n1,2\n"), r"not a readable \.npz calibration set"),
    ],
    ids=["zero-bytes", "no-arrays", "no-images", "2d", "float", "broken-zip", "csv"],
)
def test_empty_or_corrupt_calibration_npz(tmp_path: Path, make, pattern: str) -> None:
    path = tmp_path / "calib.npz"
    make(path)
    with pytest.raises(DatasetError, match=pattern):
        _plan(path).calibration  # noqa: B018


def test_truncated_calibration_npz(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez_compressed(good, images=np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8))
    assert _plan(good).calibration.images.shape == (64, 28, 28, 1)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"cut\.npz: not a readable \.npz calibration set"):
        _plan(cut).calibration  # noqa: B018


def test_calibration_npz_with_pickled_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned-npz"
    images = np.empty(1, dtype=object)
    images[0] = _ExecPayload(marker)
    np.savez(tmp_path / "evil.npz", images=images)  # an object array: stored as a pickle
    with pytest.raises(DatasetError, match=r"evil\.npz: not a readable \.npz calibration set.*allow_pickle=False"):
        load_calibration(tmp_path / "evil.npz")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((8, 32, 32), r"images are \(32, 32, 1\) \(HWC\), model tiny-residual-cnn wants \(28, 28, 1\)"),
        ((8, 28, 28, 3), r"images are \(28, 28, 3\) \(HWC\), model tiny-residual-cnn wants \(28, 28, 1\)"),
        ((8, 14, 56), r"images are \(14, 56, 1\) \(HWC\)"),
    ],
)
def test_calibration_images_of_the_wrong_size(tmp_path: Path, shape: tuple[int, ...], pattern: str) -> None:
    np.savez(tmp_path / "c.npz", images=np.zeros(shape, np.uint8))
    with pytest.raises(DatasetError, match=pattern):
        _plan(tmp_path / "c.npz").calibration  # noqa: B018


def _png(path: Path, size: tuple[int, int], value: int = 128) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full(size, value, np.uint8))


def test_calibration_folder_with_a_non_image_file(tmp_path: Path) -> None:
    folder = tmp_path / "calibration"
    for i in range(3):
        _png(folder / "shirts" / f"{i}.png", (28, 28))
    (folder / "shirts" / "notes.txt").write_text("not an image, and not named like one: skipped")
    assert _plan(folder).calibration.images.shape == (3, 28, 28, 1)
    (folder / "shirts" / "fake.png").write_text("a text file named like an image")
    with pytest.raises(DatasetError, match=r"fake\.png: cannot decode this image; remove it or replace it"):
        _plan(folder).calibration  # noqa: B018


@pytest.mark.parametrize(
    "content", [b"", b"\x89PNG\r\n\x1a\n" + bytes(20), b"\xff\xd8\xff\xe0" + bytes(10)], ids=["empty", "png", "jpg"]
)
def test_truncated_images_in_a_folder(tmp_path: Path, content: bytes) -> None:
    _png(tmp_path / "a" / "ok.png", (28, 28))
    (tmp_path / "a" / "broken.jpg").write_bytes(content)
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot decode this image"):
        load_image_folder(tmp_path, size=(28, 28), channels=1)


def test_empty_calibration_folders(tmp_path: Path) -> None:
    folder = tmp_path / "calibration"
    folder.mkdir()
    with pytest.raises(DatasetError, match=r"calibration: no class folders; expected .*/<class>/<image files>"):
        _plan(folder).calibration  # noqa: B018
    (folder / "a").mkdir()
    (folder / "a" / "readme.md").write_text("x")
    with pytest.raises(DatasetError, match=r"calibration: no images \(\.bmp, \.jpeg, \.jpg, \.png\)"):
        _plan(folder).calibration  # noqa: B018


def test_image_folder_of_mixed_sizes_is_resized_to_the_model(tmp_path: Path) -> None:
    """Wrong sizes in an image folder are resized (INTER_AREA) to the model's input, not refused."""
    for i, size in enumerate([(28, 28), (64, 48), (7, 9), (1, 1)]):
        _png(tmp_path / "a" / f"{i}.png", size, value=40 * (i + 1))
    data = load_image_folder(tmp_path, size=(28, 28), channels=1)
    assert data.images.shape == (4, 28, 28, 1)
    assert [int(data.images[i].mean()) for i in range(4)] == [40, 80, 120, 160]


def test_data_folder_missing_a_split(tmp_path: Path) -> None:
    _png(tmp_path / "data" / "train" / "a" / "0.png", (28, 28))
    plan = DataPlan(SPEC, data_dir=tmp_path / "data")
    with pytest.raises(DatasetError, match=r"data/test: no such folder; --data DIR needs DIR/test/<class>/<images>"):
        plan.test  # noqa: B018


def test_model_with_no_builtin_dataset_and_no_data(tmp_path: Path) -> None:
    from dataclasses import replace

    # (a Fashion-MNIST classifier at another size gets the built-in set resized: tests/test_bench_models.py)
    other = tuple(f"class{i}" for i in range(len(SPEC.class_names)))
    plan = DataPlan(replace(SPEC, input_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, class_names=other))
    with pytest.raises(DatasetError, match=r"takes \(3, 32, 32\) inputs and has no built-in dataset; give --data DIR"):
        plan.test  # noqa: B018
