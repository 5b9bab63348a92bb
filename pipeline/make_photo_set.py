"""Write a small labelled RGB image folder for models with no dataset offline (EfficientNet-Lite0/ImageNet).

    python -m pipeline.make_photo_set DIR [--model efficientnet_lite0] [--crops 16] [--size 224] [--extra PHOTOS ...]

No labelled ImageNet images can be had offline here. This takes the real photos that ship inside the
scikit-image wheel (CC0 / public domain: astronaut, coffee, chelsea the cat, rocket, ...), cuts seeded random
crops (scale, position, flip) and labels each crop with the **unpruned model's own top-1 class**. Accuracy on
this set is therefore top-1 agreement with the unpruned model on held-out photos, not ImageNet accuracy, and
DIR/README.txt says so. Photos are split by photo, not by crop: test photos are never seen in training.

`--extra PHOTOS` adds every image under the folder PHOTOS (.jpg, .jpeg, .png, .webp) as more **training**
photos (never test: the test photos stay the scikit-image ones, so results stay comparable). Any unlabelled
photos do, since the labels come from the unpruned model: for example the wallpapers that Debian packages
(`apt-get install mate-backgrounds plasma-workspace-wallpapers ukui-wallpapers`, under /usr/share/backgrounds
and /usr/share/wallpapers). Copies of one picture at several resolutions (`Name_1920x1080.jpg`, KDE's
`Name/contents/images/<W>x<H>.jpg`) count once, the largest.

Layout written: DIR/{train,test,calibration}/<class name>/<photo>_<n>.png, class names as the model's.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Whole photos reserved for the test split (the rest train and calibrate).
TEST_PHOTOS = ("coffee", "rocket", "camera", "coins", "page", "moon")


def _photos() -> dict[str, np.ndarray]:
    """The scikit-image sample photos as uint8 RGB, by name (grayscale ones repeated to 3 channels)."""
    import skimage.data as d

    out = {}
    names = (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "colorwheel",
        "camera",
        "brick",
        "clock",
        "coins",
        "grass",
        "gravel",
        "moon",
        "page",
        "text",
        "cell",
    )
    for name in names:
        img = np.asarray(getattr(d, name)())
        if img.dtype != np.uint8:
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out[name] = img[..., :3]
    left, _right, *_ = d.stereo_motorcycle()
    out["motorcycle"] = np.asarray(left)[..., :3]
    return out


EXTRA_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_SIDE = 1600  # extra photos are shrunk to this first (wallpapers come at 5K); crops are 0.45-1.0 of the short side


def _picture_key(path: Path, root: Path) -> str:
    """One name per picture: `Name_1920x1080.jpg` and `Name.jpg` are one; so are the sizes in a KDE wallpaper
    folder (`Name/contents/images/1920x1080.jpg`)."""
    rel = path.relative_to(root)
    parts = rel.parts
    if "contents" in parts:  # KDE: <name>/contents/images[_dark]/<W>x<H>.<ext>
        i = parts.index("contents")
        stem = "-".join(parts[:i]) + ("-dark" if any(p.endswith("_dark") for p in parts[i:]) else "")
    else:
        stem = "-".join([*parts[:-1], re.sub(r"[_-]?\d{3,5}x\d{3,5}", "", path.stem)])
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{root.name}-{stem}").strip("-").lower()


def extra_photos(folders: Sequence[Path]) -> dict[str, Path]:
    """The image files under `folders`, one per picture (the largest file), by a name safe for a file name."""
    best: dict[str, Path] = {}
    for root in folders:
        if not root.is_dir():
            raise FileNotFoundError(f"--extra {root}: not a folder of photos")
        found = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in EXTRA_SUFFIXES and p.is_file()]
        for path in found:
            key = _picture_key(path, root)
            if key not in best or path.stat().st_size > best[key].stat().st_size:
                best[key] = path
        if not found:
            raise FileNotFoundError(f"--extra {root}: no {'/'.join(EXTRA_SUFFIXES)} images under it")
    return best


def _load_photo(path: Path) -> np.ndarray | None:
    """An extra photo as uint8 RGB, shrunk so its long side is at most MAX_SIDE; None if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale where it can
            img = im.convert("RGB")
            img.thumbnail((MAX_SIDE, MAX_SIDE), Image.BILINEAR)
            return np.asarray(img)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError):
        return None


def _crops(img: np.ndarray, n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    from PIL import Image

    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        side = int(min(h, w) * rng.uniform(0.45, 1.0))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        arr = np.asarray(crop)
        out.append(arr[:, ::-1] if rng.random() < 0.5 else arr)
    return out


def make_photo_set(dest: Path, *, model: str = "efficientnet_lite0", crops: int = 16, size: int = 224,
                   seed: int = 0, extra: Sequence[Path] = ()) -> dict[str, int]:  # fmt: skip
    """Write the folder (atomically: built beside `dest`, renamed when whole). `extra`: folders of more training
    photos (module docstring). Returns image counts per split (and `extra_photos`, how many were added)."""
    import torch
    from PIL import Image

    from pipeline.artifacts import fresh_temp_dir, replace_dir
    from pipeline.models.zoo import get_model_spec

    more = extra_photos(extra)  # checked before anything is loaded or written
    spec = get_model_spec(model)
    net = spec.build().eval()
    rng = np.random.default_rng(seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_temp_dir(dest.parent, dest.name)
    counts = {"train": 0, "test": 0, "calibration": 0, "extra_photos": 0}
    labels_seen: set[str] = set()
    photos = _photos()
    for key, path in more.items():
        img = _load_photo(path)
        if img is not None and min(img.shape[:2]) >= 32:
            photos[key] = img
            counts["extra_photos"] += 1
    for name, img in photos.items():
        splits = [("test", crops)] if name in TEST_PHOTOS else [("train", crops), ("calibration", max(2, crops // 4))]
        for split, n in splits:
            batch = np.stack(_crops(img, n, size, rng))
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
            x = (x - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
            with torch.no_grad():
                top1 = net(x).argmax(1).tolist()
            for i, (arr, cls) in enumerate(zip(batch, top1, strict=True)):
                folder = tmp / split / spec.class_names[cls]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(folder / f"{name}_{i:02d}.png")
                labels_seen.add(spec.class_names[cls])
            counts[split] += n
    sources = ", ".join(map(str, extra))
    extra_note = f"Extra training photos ({counts['extra_photos']}) from: {sources}\n" if extra else ""
    (tmp / "README.txt").write_text(
        f"Photos from the scikit-image wheel (skimage.data), {crops} seeded random crops each at {size}x{size}.\n"
        f"Labels are the top-1 class of the unpruned {spec.name}, not human labels: accuracy on this set is\n"
        "top-1 agreement with the unpruned model. Test photos (held out whole): " + ", ".join(TEST_PHOTOS) + ".\n"
        f"Counts: {counts}; {len(labels_seen)} distinct classes. Made by `python -m pipeline.make_photo_set`.\n"
        + extra_note
    )
    replace_dir(tmp, dest)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--crops", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--extra", type=Path, nargs="+", default=[], metavar="PHOTOS",
                    help="folders of more (unlabelled) training photos, e.g. /usr/share/backgrounds")  # fmt: skip
    args = ap.parse_args(argv)
    try:
        counts = make_photo_set(args.dest, model=args.model, crops=args.crops, size=args.size, extra=args.extra)
    except ModuleNotFoundError as exc:
        print(f"make_photo_set needs scikit-image: pip install scikit-image ({exc})", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"make_photo_set: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
