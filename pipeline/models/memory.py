"""A model held in memory (the Python API): a ModelSpec that builds copies of it, and a checkpoint named by its key.

The key is the sha256 of the module's structure (its class and `str(module)`) and of every state_dict tensor
(name, dtype, shape, bytes). The checkpoint is written once per key (atomically, pipeline/models/checkpoint.py)
and handed to the chain like a user's file, so the baseline stage's cache key is the model's: re-running a
notebook cell with the same weights skips every fresh stage, one changed weight runs them again.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import UsageError
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.spec import ModelSpec
from pipeline.models.zoo import normalization

FOLDER = "inputs"  # runs/<target>/inputs/model-<key>.pt
KEEP = 4  # in-memory model checkpoints kept per run folder (the most recently used)


def model_key(model: nn.Module) -> str:
    """sha256 of the module's structure and weights: equal for equal models, different for one changed weight."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}\n{model}\n".encode())
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model).cpu()
    except Exception as exc:  # deepcopy fails in many ways on exotic modules (hooks holding locks, compiled graphs)
        raise UsageError(
            f"model {type(model).__name__}: cannot copy it ({type(exc).__name__}: {exc}); pass the plain nn.Module "
            "(not a torch.compile'd or wrapped one)"
        ) from None


def memory_spec(
    model: nn.Module,
    *,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    class_names: tuple[str, ...],
) -> ModelSpec:
    """A spec whose build() returns a fresh copy of `model` as it is now, weights included (so load_checkpoint
    fits it); later changes to the caller's module do not reach it."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    template = _copy(model).eval()
    mean, std = normalization(input_shape[0], mean, std)
    return ModelSpec(name=type(model).__name__, build=lambda: copy.deepcopy(template), input_shape=input_shape,
                     mean=mean, std=std, class_names=class_names)  # fmt: skip


def memory_checkpoint(spec: ModelSpec, run_dir: Path) -> Path:
    """The checkpoint of the model `spec` builds, `run_dir`/inputs/model-<key>.pt, written when it is not there."""
    model = spec.build()
    key = model_key(model)
    path = run_dir / FOLDER / f"model-{key[:24]}.pt"
    if not path.is_file():  # written whole or not at all: a file of this name holds this model
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, path, meta={"model": spec.name, "source": "in memory", "key": key})
    else:
        os.utime(path)  # used now: the newest
    _forget_old(path.parent)
    return path


def _forget_old(folder: Path, keep: int = KEEP) -> None:
    """Remove all but the `keep` most recently used in-memory model checkpoints (each deploy of an edited model
    writes a new one; the stages' own outputs are what a rerun reuses)."""
    files = sorted(folder.glob("model-*.pt"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)
