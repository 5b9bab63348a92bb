"""What the benchmarks share on their command lines: the command as typed, the data and the output options."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pipeline.deploy import REPO


def command(module: str, argv: list[str] | None) -> str:
    """`python -m MODULE ARGS...` as it was run (for BENCHMARKS.md)."""
    return (f"python -m {module} " + shlex.join(argv if argv is not None else sys.argv[1:])).strip()


def add_data_args(ap: argparse.ArgumentParser, *, train_images: int, test_images: int) -> None:
    """Fashion-MNIST subset sizes, and efficientnet_lite0's photo set (pipeline.make_photo_set)."""
    ap.add_argument("--train-images", type=int, default=train_images)
    ap.add_argument("--test-images", type=int, default=test_images)
    ap.add_argument("--photo-crops", type=int, default=48, help="crops per photo (efficientnet_lite0's photo set)")
    ap.add_argument("--photo-extra", type=Path, nargs="+", default=[], metavar="PHOTOS",
                    help="folders of more training photos for efficientnet_lite0's photo set (pipeline.make_photo_set "
                         "--extra), e.g. /usr/share/backgrounds /usr/share/wallpapers")  # fmt: skip


def add_output_args(ap: argparse.ArgumentParser, *, results: int = 1) -> None:
    """Where the section is written, or not, and re-rendering from saved runs (`results` of them at most)."""
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true")
    if results == 1:
        ap.add_argument("--from-result", type=Path, help="write the section from this saved run")
    else:
        ap.add_argument("--from-result", type=Path, nargs="+", help="write the section from these saved runs")
