"""`python -m pipeline.make_photo_set --extra PHOTOS`: more unlabelled training photos for the photo set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.make_photo_set import MAX_SIDE, _load_photo, extra_photos, main


def _write(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return path


def test_one_picture_at_several_resolutions_counts_once_the_largest_file(tmp_path: Path) -> None:
    root = tmp_path / "backgrounds"
    _write(root / "Elephants.jpg", 64, 48)
    big = _write(root / "Elephants_3840x2160.jpg", 320, 180, seed=1)
    _write(root / "Elephants_1920x1080.jpg", 160, 90, seed=2)
    kde = _write(root / "Autumn" / "contents" / "images" / "5120x2880.png", 200, 120, seed=3)
    _write(root / "Autumn" / "contents" / "images" / "1280x800.png", 64, 40, seed=4)
    dark = _write(root / "Autumn" / "contents" / "images_dark" / "1280x800.png", 64, 40, seed=5)
    _write(root / "nature" / "LadyBird.webp", 80, 60, seed=6)
    (root / "README").write_text("not a photo")
    (root / "metadata.json").write_text("{}")
    found = extra_photos([root])
    assert sorted(found) == ["backgrounds-autumn", "backgrounds-autumn-dark", "backgrounds-elephants",
                             "backgrounds-nature-ladybird"]  # fmt: skip
    assert found["backgrounds-elephants"] == big
    assert found["backgrounds-autumn"] == kde and found["backgrounds-autumn-dark"] == dark


def test_a_missing_folder_or_one_with_no_photos_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere: not a folder"):
        extra_photos([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"empty: no \.jpg/\.jpeg/\.png/\.webp images"):
        extra_photos([tmp_path / "empty"])


def test_a_huge_photo_is_shrunk_and_an_unreadable_one_is_skipped(tmp_path: Path) -> None:
    img = _load_photo(_write(tmp_path / "wide.png", 4000, 300))
    assert img is not None and img.dtype == np.uint8 and img.shape == (MAX_SIDE * 300 // 4000, MAX_SIDE, 3)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((50, 60), 128, np.uint8)).save(grey)
    got = _load_photo(grey)
    assert got is not None and got.shape == (50, 60, 3)  # greyscale read as RGB
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert _load_photo(bad) is None


def test_the_cli_names_a_bad_extra_folder_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    dest = tmp_path / "photos"
    assert main([str(dest), "--extra", str(tmp_path / "no such dir")]) == 2
    err = capsys.readouterr().err
    assert "no such dir: not a folder of photos" in err
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_extra_photos_train_only_and_the_test_split_is_unchanged(tmp_path: Path, monkeypatch) -> None:
    """The real make_photo_set with EfficientNet-Lite0 labelling the crops; the scikit-image photos (not installed
    in CI) stood in for by two seeded pictures, one of them a test photo."""
    import pipeline.make_photo_set as mps

    rng = np.random.default_rng(3)
    fake = {"coffee": rng.integers(0, 256, (120, 160, 3), dtype=np.uint8),
            "chelsea": rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)}  # fmt: skip
    monkeypatch.setattr(mps, "_photos", lambda: dict(fake))
    extra = tmp_path / "wallpapers"
    _write(extra / "Dune_1920x1080.jpg", 200, 120, seed=7)
    _write(extra / "Dune.jpg", 80, 48, seed=8)
    _write(extra / "deep" / "Goldfish.png", 90, 90, seed=9)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "tiny.png")  # too small to crop: left out
    plain = mps.make_photo_set(tmp_path / "plain", crops=2, size=64)
    more = mps.make_photo_set(tmp_path / "more", crops=2, size=64, extra=[extra])
    assert plain["extra_photos"] == 0 and more["extra_photos"] == 2
    assert more["test"] == plain["test"] == 2 and more["train"] == plain["train"] + 2 * 2

    def files(root: Path, split: str) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / split).rglob("*.png"))}

    assert files(tmp_path / "more", "test") == files(tmp_path / "plain", "test")  # the same held-out crops
    names = {p.name.rsplit("_", 1)[0] for p in (tmp_path / "more" / "train").rglob("*.png")}
    assert names == {"chelsea", "wallpapers-dune", "wallpapers-deep-goldfish"}
    assert "Extra training photos (2) from: " + str(extra) in (tmp_path / "more" / "README.txt").read_text()
