"""Data sources: real Fashion-MNIST from Debian's package, image folders, calibration sets; broken input refused."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.calibration import load_calibration
from pipeline.data.fashion_mnist import load_fashion_mnist, read_idx
from pipeline.data.image_folder import load_image_folder
from pipeline.data.sources import FMNIST_CALIBRATION, DataPlan
from pipeline.errors import DatasetError
from tests.conftest import needs_fmnist


@needs_fmnist
def test_real_fashion_mnist() -> None:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    assert 60 < train.images.mean() < 80  # real clothing pixels, not noise (mean ~72.9)


def _idx(path: Path, magic: int, dims: tuple[int, ...], body: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + body)
    return path


def test_idx_round_trip(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(_idx(tmp_path / "a.gz", 0x803, (2, 3, 4), arr.tobytes()), magic=0x803), arr)


def test_truncated_idx_is_refused(tmp_path: Path) -> None:
    path = _idx(tmp_path / "a.gz", 0x803, (2, 3, 4), bytes(20))
    with pytest.raises(DatasetError, match=r"a.gz: 20 data bytes for dims \(2, 3, 4\); the file is truncated"):
        read_idx(path, magic=0x803)


def test_wrong_magic_and_bad_gzip(tmp_path: Path) -> None:
    path = _idx(tmp_path / "a.gz", 0x801, (3,), bytes(3))
    with pytest.raises(DatasetError, match="not an IDX file of the expected kind"):
        read_idx(path, magic=0x803)
    bad = tmp_path / "b.gz"
    bad.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DatasetError, match=r"b\.gz: corrupt gzip file"):
        read_idx(bad, magic=0x803)


def test_missing_dataset_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def test_image_folder(tmp_path: Path) -> None:
    import cv2

    for cls, value in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            img = np.full((40, 30, 3), value + i, np.uint8)
            cv2.imwrite(str(tmp_path / cls / f"{i}.png"), img)
    data = load_image_folder(tmp_path, size=(32, 32), channels=3)
    assert data.images.shape == (6, 32, 32, 3) and data.class_names == ("cat", "dog")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[0].mean() == pytest.approx(10, abs=1) and data.images[5].mean() == pytest.approx(202, abs=1)
    gray = load_image_folder(tmp_path, size=(28, 28), channels=1)
    assert gray.images.shape == (6, 28, 28, 1)


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no class folders"):
        load_image_folder(tmp_path, size=(8, 8), channels=1)
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path, size=(8, 8), channels=1)
    (tmp_path / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"x.png: cannot decode this image"):
        load_image_folder(tmp_path, size=(8, 8), channels=1)


def test_committed_calibration_set() -> None:
    calib = load_calibration(FMNIST_CALIBRATION)
    assert calib.images.shape == (500, 28, 28, 1)
    assert np.bincount(calib.labels).tolist() == [50] * 10
    assert (FMNIST_CALIBRATION.parent / "LICENSE").is_file()


@needs_fmnist
def test_calibration_comes_from_the_train_split() -> None:
    with np.load(FMNIST_CALIBRATION) as npz:
        idx, images = npz["train_indices"], npz["images"]
    train = load_fashion_mnist("train")
    assert np.array_equal(train.images[idx, :, :, 0], images)


def test_calibration_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such calibration file"):
        load_calibration(tmp_path / "none.npz")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match="non-empty"):
        load_calibration(tmp_path / "empty.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(DatasetError, match="must be uint8"):
        load_calibration(tmp_path / "float.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"not a readable \.npz"):
        load_calibration(tmp_path / "junk.npz")


def test_wrong_image_size_is_named(tmp_path: Path) -> None:
    from pipeline.models.zoo import get_model_spec

    np.savez(tmp_path / "c.npz", images=np.zeros((4, 32, 32), np.uint8))
    plan = DataPlan(get_model_spec("fmnist_cnn"), calibration_path=tmp_path / "c.npz")
    with pytest.raises(DatasetError, match=r"images are \(32, 32, 1\) \(HWC\), model fmnist_cnn wants \(28, 28, 1\)"):
        plan.calibration  # noqa: B018
