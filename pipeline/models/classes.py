"""The class names a deploy ships must be the model's outputs, one name per output, in output order.

Checked before any stage runs: a 10-output model with a 3-class folder would otherwise publish a labels.txt of
3 lines for an output of 10 scores (an app doing labels[argmax] crashes), scored 0% against a budget "met".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.errors import UsageError
from pipeline.models.spec import ModelSpec


def read_classes_file(path: Path) -> tuple[str, ...]:
    """Class names, one per line, in the model's output order (blank lines and surrounding spaces ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"--classes {path}: cannot read it ({exc}); give a UTF-8 text file, one name per line"
        ) from None
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--classes {path}: names appear twice: {', '.join(dupes[:5])}")
    return names


def model_outputs(spec: ModelSpec) -> int:
    """The number of scores the model gives for one input (its last dimension)."""
    model = spec.build().eval()
    with torch.no_grad():
        out = model(torch.zeros(1, *spec.input_shape))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(
            f"model {spec.name}: a classifier must return one (1, classes) tensor for a batch of 1, got {shape}"
        )
    return int(out.shape[1])


def check_classes(
    spec: ModelSpec, *, where: str, from_file: bool = False, option: str = "--classes FILE", listing: str = "the file"
) -> None:
    """UsageError unless there are at least two classes and exactly one per model output. `from_file`: the names
    were listed by the user (in `listing`); `option` is how the caller gives them (the Python API: classes=)."""
    names: Sequence[str] = spec.class_names
    if len(names) < 2:
        raise UsageError(
            f"{where} names {len(names)} class{'es' if len(names) != 1 else ''} ({', '.join(names) or 'none'}); "
            "a classifier needs at least 2: add a folder per class (train/<class>/, test/<class>/)"
        )
    n = model_outputs(spec)
    if n != len(names):
        fix = (
            f"make {listing} list the model's {n} classes in output order"
            if from_file
            else f"give {option} with the model's {n} class names in output order (each class folder named "
            "after one of them), or use data with one class folder per output"
        )
        raise UsageError(
            f"model {spec.name} has {n} outputs but {where} names {len(names)} classes "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}): {fix}"
        )
