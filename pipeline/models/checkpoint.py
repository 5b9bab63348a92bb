"""Checkpoints that survive structured pruning and never execute code when loaded.

Format `edgeship-ckpt/1`: {"format", "state_dict", "shapes": {module: {kind, plain ints}}, "meta"} - tensors
and plain Python values only, so `torch.load(weights_only=True)` reads it. Loading builds the model from its
factory, gives every recorded Conv2d/BatchNorm2d/Linear the recorded (pruned) shape, then loads the weights
strictly. A plain state_dict (what users have) is accepted for unpruned models.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import CheckpointError

FORMAT = "edgeship-ckpt/1"


def _shape_of(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Conv2d):
        return {
            "kind": "conv",
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "groups": module.groups,
        }
    if isinstance(module, nn.BatchNorm2d):
        return {"kind": "bn", "num_features": module.num_features}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features}
    return None


def save_checkpoint(model: nn.Module, path: Path, *, meta: dict[str, Any]) -> None:
    shapes = {name: s for name, m in model.named_modules() if (s := _shape_of(m)) is not None}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plain_meta = json.loads(json.dumps(meta, default=str))  # plain types only: weights_only loading reads it
    blob = {"format": FORMAT, "state_dict": state, "shapes": shapes, "meta": plain_meta}
    buf = io.BytesIO()
    torch.save(blob, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for bad bytes; tell unsafe from corrupt
        text = str(exc)
        if "Weights only load failed" in text and ("GLOBAL" in text or "Unsupported" in text):
            reason = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise CheckpointError(
                f"{path}: refused: the file is not plain weights, it asks to run or import code ({reason[:200]}). "
                f"Save a state_dict instead: torch.save(model.state_dict(), path)"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({type(exc).__name__}: "
            f"{text.splitlines()[0][:200] if text else ''})"
        ) from None


def _reshape(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> None:
    """Give each recorded layer the recorded shape (fresh tensors; the weights are loaded next)."""
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        m = modules.get(name)
        if m is None or _shape_of(m) is None or _shape_of(m)["kind"] != shape.get("kind"):
            raise CheckpointError(f"layer {name!r} ({shape.get('kind')}) is not in this model")
        if isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = shape["in_channels"], shape["out_channels"], shape["groups"]
            m.weight = nn.Parameter(torch.empty(m.out_channels, m.in_channels // m.groups, *m.kernel_size))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_channels))
        elif isinstance(m, nn.BatchNorm2d):
            n = m.num_features = shape["num_features"]
            if m.affine:
                m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
            if m.track_running_stats:
                m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = shape["in_features"], shape["out_features"]
            m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_features))


def load_checkpoint(path: Path, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """Load weights into a freshly built `model` (reshaped to pruned shapes first). Returns (model, meta)."""
    blob = _read(path)
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        state, meta = blob["state_dict"], dict(blob.get("meta", {}))
        try:
            _reshape(model, blob["shapes"])
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: a checkpoint for another architecture: {exc}") from None
    elif isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        state, meta = blob, {}
    elif isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        state, meta = blob["state_dict"], {}
    else:
        raise CheckpointError(f"{path}: not a state_dict nor an edgeship checkpoint (got {type(blob).__name__})")
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in ours.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if items
        ]
        raise CheckpointError(
            f"{path}: does not fit model {type(model).__name__} ({'; '.join(parts)}); "
            f"is it a checkpoint of another architecture? Pick the matching --model"
        )
    model.load_state_dict(state, strict=True)
    return model.eval(), meta
