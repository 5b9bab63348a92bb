"""Training data streamed from disk (issue 18): image folders and WebDataset-style tar shards are listed, not
decoded; fine-tuning reads them through a DataLoader; fingerprints are file lists, sizes and mtimes; the data
checks a new user needs fail early with a clear message.

The memory test generates folders of 2,000 and 20,000 64x64 RGB JPEGs (20,000 decoded would be 246 MB) and
fine-tunes on each in a fresh process, with a decoding worker; the peak RSS of the process and of its
largest child (the worker) must agree within 10%.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.data.imageset import ImageSet
from pipeline.errors import DatasetError, UsageError
from pipeline.models.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
CLASSES = tuple(f"c{i}" for i in range(4))


class TinyRGB(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture
def one_thread():
    """Fine-tune on one thread, as each DDP rank does: two threads on this shared 2-core machine crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_spec(size: int = 64, classes: tuple[str, ...] = CLASSES) -> ModelSpec:
    return ModelSpec("tiny-rgb", lambda: TinyRGB(len(classes)), (3, size, size), (0.5,) * 3, (0.25,) * 3, classes)


def write_folder(root: Path, n: int, *, size: int = 64, classes: tuple[str, ...] = CLASSES, ext: str = ".jpg") -> Path:
    """root/<class>/NNNNNN.jpg: n images, 16 distinct encoded ones written in turn (fast to make)."""
    import cv2

    rng = np.random.default_rng(0)
    blobs = []
    for k in range(16):
        img = np.clip(rng.normal(128 + 4 * k, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        blobs.append(cv2.imencode(ext, img)[1].tobytes())
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / classes[i % len(classes)] / f"{i:06d}{ext}").write_bytes(blobs[i % 16])
    return root


def _peak_rss_main(root: str) -> None:
    """In a fresh process: plan the folder, stream-fine-tune a few steps; print the peak RSS (KiB)."""
    import resource

    from pipeline.data.sources import DataPlan
    from pipeline.targets import Finetune
    from pipeline.train.distill import finetune_kd

    torch.set_num_threads(1)
    spec = tiny_spec()
    plan = DataPlan(spec, data_dir=Path(root), val_max=200)
    stream = plan.train_stream
    val = spec.batches(plan.val, limit=200)
    cfg = Finetune(epochs=0.01, batch_size=32, min_steps=12, evaluations=2, workers=1, device="cpu")
    result = finetune_kd(spec.build(), spec.build(), spec, stream, cfg, val=val)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"train": len(stream), "kind": type(stream).__name__, "seen": result.images_seen,
                      "self_kib": own, "worker_kib": child}))  # fmt: skip


def _measure(root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.test_streaming_data", "rss", str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_is_flat_in_the_number_of_images(tmp_path: Path) -> None:
    small = _measure(write_folder(tmp_path / "small" / "train", 2000).parent)
    large = _measure(write_folder(tmp_path / "large" / "train", 20000).parent)
    assert small["kind"] == large["kind"] == "ImageIndex"  # streamed: an index of files, nothing decoded
    assert large["train"] == 20000 - 200 and small["train"] == 2000 - 200
    assert small["seen"] == large["seen"] == 12 * 32
    for key in ("self_kib", "worker_kib"):
        ratio = large[key] / small[key]
        assert ratio < 1.10, f"{key}: {large[key]} KiB at 20k images vs {small[key]} KiB at 2k ({ratio:.3f}x)"
    # what decoding them all would have cost, for scale: 20k * 64*64*3 bytes = 246 MB (~240,000 KiB)
    assert large["self_kib"] - small["self_kib"] < 0.1 * (20000 - 2000) * 64 * 64 * 3 / 1024


def test_folder_is_streamed_and_fingerprinted_by_files(tmp_path: Path) -> None:
    from pipeline.data.loader import StreamDataset
    from pipeline.data.sources import DataPlan
    from pipeline.data.stream import METHOD_FILES, ImageIndex

    root = tmp_path / "d"
    write_folder(root / "train", 80, ext=".png")
    write_folder(root / "test", 12, ext=".png")
    spec = tiny_spec()
    plan = DataPlan(spec, data_dir=root)
    assert isinstance(plan.train_stream, ImageIndex) and len(plan.train_stream) == 72 and len(plan.val) == 8
    fp = plan.fingerprints()["train"]
    assert fp["method"] == METHOD_FILES and fp["kind"] == "folder" and fp["images"] == 80
    name = plan.describe()["train"]
    assert fp["sha256"][:16] in name and METHOD_FILES in name
    # the same bytes through the DataLoader's dataset as through the in-memory decode
    ds = StreamDataset(plan.train_stream, size=(64, 64), channels=3)
    x, y, resized = ds.__getitems__([0, 5])
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 64, 64) and int(resized.sum()) == 0
    assert torch.equal(x[1].permute(1, 2, 0), torch.from_numpy(plan.train_sample(None).images[5]))
    assert list(y) == list(plan.train_stream.labels[[0, 5]])
    # stage caching: unchanged files, same key; one file rewritten (size/mtime), another key
    assert DataPlan(spec, data_dir=root).describe() == plan.describe()
    victim = sorted((root / "train" / "c1").iterdir())[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert DataPlan(spec, data_dir=root).describe()["train"] != name


def test_shuffle_and_shifts_do_not_depend_on_workers_or_ranks(tmp_path: Path) -> None:
    """Rank r's batches are every W-th image of the seeded permutation; the shift of an image is its own."""
    from pipeline.data.loader import make_loader

    images = np.random.default_rng(1).integers(0, 255, (40, 8, 8, 1), dtype=np.uint8)
    data = ImageSet(images, np.arange(40) % 4, CLASSES, "mem")
    whole = [b for b in make_loader(data, size=(8, 8), channels=1, batch_size=8, seed=5, workers=0).loader]
    halves = [list(make_loader(data, size=(8, 8), channels=1, batch_size=4, seed=5, rank=r, world_size=2,
                               workers=1).loader) for r in (0, 1)]  # fmt: skip
    for k, (x, y, _) in enumerate(whole):
        assert torch.equal(x[0::2], halves[0][k][0]) and torch.equal(x[1::2], halves[1][k][0])
        assert torch.equal(y[0::2], halves[0][k][1])
    assert not torch.equal(whole[0][0], torch.from_numpy(images[:8]).permute(0, 3, 1, 2))  # shuffled, shifted


def _shard_set(root: Path, n: int = 60, *, size: int = 28) -> ImageSet:
    from pipeline.data.shards import write_shards

    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % len(CLASSES)
    write_shards(zip(images, labels, strict=True), root / "train", per_shard=25)
    write_shards(zip(images[:12], labels[:12], strict=True), root, prefix="test", per_shard=5)
    return ImageSet(images, labels, CLASSES, "made")


def test_tar_shards_are_read_in_place(tmp_path: Path, one_thread: None) -> None:
    from pipeline.data.loader import StreamDataset
    from pipeline.data.sources import DataPlan
    from pipeline.data.stream import METHOD_SHARDS
    from pipeline.targets import Finetune
    from pipeline.train.distill import finetune_kd

    made = _shard_set(tmp_path)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    spec = tiny_spec(28)
    plan = DataPlan(spec, data_dir=tmp_path)  # train: DIR/train/*.tar, test: DIR/test-*.tar
    index = plan._source("train")
    assert index.kind == "tar shards" and len(index) == 60 and index.files[0].endswith("shard-000000.tar")
    x, y, _ = StreamDataset(index, size=(28, 28), channels=3).__getitems__(list(range(60)))
    assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(made.images))  # PNG: the very pixels
    assert list(y) == list(made.labels)
    assert len(plan.test) == 12 and plan.fingerprints()["train"]["method"] == METHOD_SHARDS
    before = plan.describe()["train"]
    os.utime(tmp_path / "train" / "shard-000001.tar", ns=(1, 1))
    assert DataPlan(spec, data_dir=tmp_path).describe()["train"] != before
    cfg = Finetune(epochs=1, batch_size=16, min_steps=4, early_stopping=False, workers=1, device="cpu")
    result = finetune_kd(spec.build(), spec.build(), spec, plan.train_stream, cfg)
    n = len(plan.train_stream)
    assert n == 60 - len(plan.val) and result.steps == 4 and result.images_seen == n and result.workers == 1


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_broken_shards_are_named(tmp_path: Path) -> None:
    import cv2

    from pipeline.data.shards import scan_shards

    png = cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes()
    cases = {
        "no-label.tar": ({"a/001.png": png, "a/002.png": png, "a/002.cls": b"1"}, "sample 'a/001' has an image but no"),
        "bad-label.tar": ({"001.png": png, "001.cls": b"7"}, "001.cls says class 7; valid class indices are 0..3"),
        "text-label.tar": ({"001.png": png, "001.cls": b"cat"}, "001.cls holds 'cat', not a class index"),
    }
    for name, (members, message) in cases.items():
        shard = _tar(tmp_path / name, members)
        with pytest.raises(DatasetError) as err:
            scan_shards([shard], class_names=CLASSES, source="s")
        assert str(shard) in str(err.value) and message in str(err.value), err.value
    gz = tmp_path / "zipped.tar"
    with tarfile.open(gz, "w:gz") as tar:
        info = tarfile.TarInfo("001.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(DatasetError, match="not a readable plain tar shard"):
        scan_shards([gz], class_names=CLASSES, source="s")


def _user_model(tmp_path: Path, classes: int) -> Path:
    from pipeline.models.checkpoint import save_checkpoint

    ckpt = tmp_path / "m.pt"
    save_checkpoint(TinyRGB(classes), ckpt, meta={})
    return ckpt


def _request(tmp_path: Path, data: Path, *, outputs: int = 4, **kw):
    from pipeline.api import build_request

    return build_request(f"{__name__}:TinyRGB" if outputs == 4 else f"{__name__}:ten_outputs", "host", data=data,
                         checkpoint=_user_model(tmp_path, outputs), input_shape=(3, 64, 64), mean=0.5, std=0.25,
                         runs_dir=tmp_path / "runs", **kw)  # fmt: skip


def ten_outputs() -> TinyRGB:
    return TinyRGB(10)


def test_class_folders_must_match_the_model_outputs(tmp_path: Path) -> None:
    two = ("cat", "dog")
    for split in ("train", "test", "calibration"):
        write_folder(tmp_path / split, 8, classes=two)
    with pytest.raises(UsageError) as err:
        _request(tmp_path, tmp_path, outputs=10)
    text = str(err.value)
    assert "has 10 outputs but" in text and "names 2 classes (cat, dog)" in text and "classes=" in text
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(["cat", "dog", *(f"other{i}" for i in range(8))]) + "\n")
    req = _request(tmp_path, tmp_path, outputs=10, classes=names)  # 10 names: the 2 folders are a subset
    assert set(req.data.train_stream.labels) == {0, 1} and len(req.spec.class_names) == 10
    assert not (tmp_path / "runs" / "host" / "baseline").exists()


def test_a_missing_calibration_split_is_reported_before_any_stage(tmp_path: Path) -> None:
    for split in ("train", "test"):
        write_folder(tmp_path / split, 8)
    with pytest.raises(DatasetError) as err:
        _request(tmp_path, tmp_path)
    assert f"{tmp_path / 'calibration'}: no such calibration split" in str(err.value)
    assert "--calibration" in str(err.value) and not (tmp_path / "runs" / "host").exists()
    with pytest.raises(DatasetError, match="no such calibration file or folder"):
        _request(tmp_path, tmp_path, calibration=tmp_path / "nope.npz")


def test_shards_need_class_names(tmp_path: Path) -> None:
    _shard_set(tmp_path)
    write_folder(tmp_path / "calibration", 4, size=28)
    with pytest.raises(UsageError, match=r"tar shards label samples by class index .*classes\.txt"):
        _request(tmp_path, tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    from pipeline.api import build_request

    req = build_request(f"{__name__}:TinyRGB", "host", data=tmp_path, checkpoint=_user_model(tmp_path, 4),
                        input_shape=(3, 28, 28), mean=0.5, std=0.25, runs_dir=tmp_path / "runs")  # fmt: skip
    assert req.spec.class_names == CLASSES and req.data.train_stream.kind == "tar shards"


def test_resized_images_are_counted_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                one_thread: None) -> None:  # fmt: skip
    from pipeline.data.sources import DataPlan
    from pipeline.targets import Finetune
    from pipeline.train.distill import finetune_kd

    write_folder(tmp_path / "train", 40, size=80)  # the model takes 64x64
    spec = tiny_spec()
    plan = DataPlan(spec, data_dir=tmp_path)
    with caplog.at_level(logging.WARNING):
        val = plan.val
    assert val.images.shape[1:] == (64, 64, 3)
    assert any("4 of 4 resized to 64x64" in r.getMessage() for r in caplog.records), caplog.text
    cfg = Finetune(epochs=1, batch_size=12, min_steps=3, early_stopping=False, workers=0, device="cpu")
    result = finetune_kd(spec.build(), spec.build(), spec, plan.train_stream, cfg)
    assert result.resized == result.images_seen == 36


if __name__ == "__main__" and sys.argv[1] == "rss":
    _peak_rss_main(sys.argv[2])


def test_a_photo_model_gets_its_rgb_augmentation(tmp_path: Path, one_thread: None) -> None:
    """A spec with augment="rgb" (crops, flips, jitter: pipeline/train/augment.py) trains through the stream."""
    from dataclasses import replace

    from pipeline.data.sources import DataPlan
    from pipeline.targets import Finetune
    from pipeline.train.distill import finetune_kd

    write_folder(tmp_path / "train", 40, size=32)
    spec = replace(tiny_spec(32), augment="rgb")
    plan = DataPlan(spec, data_dir=tmp_path)
    cfg = Finetune(epochs=1, batch_size=12, min_steps=3, early_stopping=False, workers=0, device="cpu")
    result = finetune_kd(spec.build(), spec.build(), spec, plan.train_stream, cfg)
    assert result.steps == 3 and all(torch.isfinite(p).all() for p in result.model.parameters())
