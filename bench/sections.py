"""BENCHMARKS.md, one `## ` section per benchmark: each script replaces its own section (or appends it)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.artifacts import write_text_atomic


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section of `path` whose heading line starts with `heading` by `section`, up to the next
    `## ` heading; append it when there is none (creating the file)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}.*?\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    )
    write_text_atomic(path, text)
