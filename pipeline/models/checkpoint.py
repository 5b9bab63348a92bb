"""Checkpoints that survive structured pruning and never execute code when loaded.

Format `edgeship-ckpt/1`: {"format", "state_dict", "shapes": {module: {kind, plain ints}}, "tensors":
{state key: shape}, "meta"} - tensors and plain Python values only, so `torch.load(weights_only=True)` reads it.
Loading builds the model from its factory, gives every recorded Conv2d/BatchNorm2d/Linear the recorded (pruned)
shape, gives the other parameters and buffers listed in "tensors" (a custom layer's own weights, which
Torch-Pruning cuts along with the channels they follow) their saved shape, then loads the weights strictly.
A plain state_dict (what users have) is accepted for unpruned models.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.artifacts import write_bytes_atomic
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
    # parameters and buffers of layers `shapes` does not describe (custom layers): their shapes, so that a
    # pruned custom parameter can be given its pruned shape again when loading
    tensors = {k: list(v.shape) for k, v in state.items() if k.rpartition(".")[0] not in shapes}
    plain_meta = json.loads(json.dumps(meta, default=str))  # plain types only: weights_only loading reads it
    blob = {"format": FORMAT, "state_dict": state, "shapes": shapes, "tensors": tensors, "meta": plain_meta}
    buf = io.BytesIO()
    torch.save(blob, buf)
    # temporary file beside `path`, fsync, rename; removed on failure (disk full): old file or new, whole
    write_bytes_atomic(path, buf.getvalue())


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    _check_crc(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for bad bytes; tell unsafe from corrupt
        text = str(exc)
        if "Weights only load failed" in text and ("GLOBAL" in text or "Unsupported" in text):
            reason = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
            why = (
                f"it asks to run or import code ({reason[:200]})"
                if "GLOBAL" in reason
                else f"(corrupt, or a pickle that does more than store weights: {reason[:200]})"
            )
            raise CheckpointError(
                f"{path}: refused: the file is not plain weights, {why}. "
                f"Save a state_dict instead: torch.save(model.state_dict(), path)"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({type(exc).__name__}: "
            f"{text.splitlines()[0][:200] if text else ''})"
        ) from None


def _check_crc(path: Path) -> None:
    """torch.load does not check the zip's CRC-32s: a flipped bit in the weights would load silently."""
    if not zipfile.is_zipfile(path):
        return  # a legacy (non-zip) file, or garbage: torch.load tells which
    try:
        with zipfile.ZipFile(path) as zf:
            if not any(info.CRC for info in zf.infolist()):
                return  # written without CRCs (torch.serialization.set_crc32_options(False))
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({exc})") from None
    if bad is not None:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, corrupt: record {bad!r} fails its CRC-32 check"
        )


_MAX_DIM = 1 << 24  # no real layer has more channels; a bigger number is a corrupt or hostile record


def _check_ints(name: str, shape: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        v = shape.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= _MAX_DIM:
            raise CheckpointError(f"layer {name!r}: corrupt shape record ({key}={v!r})")


def _reshape(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> None:
    """Give each recorded layer the recorded shape (fresh tensors; the weights are loaded next)."""
    if not isinstance(shapes, dict) or not all(isinstance(v, dict) for v in shapes.values()):
        raise CheckpointError("corrupt layer shape records")
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        m = modules.get(name)
        if m is None or _shape_of(m) is None or _shape_of(m)["kind"] != shape.get("kind"):
            raise CheckpointError(f"layer {name!r} ({shape.get('kind')}) is not in this model")
        _check_ints(name, shape, tuple(k for k in _shape_of(m) if k != "kind"))
        if isinstance(m, nn.Conv2d) and shape["in_channels"] % shape["groups"]:
            raise CheckpointError(f"layer {name!r}: corrupt shape record (in_channels not a multiple of groups)")
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


def _is_state(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _resize_tensors(model: nn.Module, state: dict[str, torch.Tensor], tensors: Any) -> None:
    """Parameters/buffers listed in the checkpoint's "tensors" record get the shape of the saved tensor.

    Only entries the checkpoint lists, of the same rank, owned by a module of this model: anything else
    is left for the strict comparison in load_checkpoint to report.
    """
    if not isinstance(tensors, dict):
        return
    modules = dict(model.named_modules())
    for key in tensors:
        saved = state.get(key) if isinstance(key, str) else None
        owner, _, attr = key.rpartition(".") if isinstance(key, str) else ("", "", "")
        m = modules.get(owner)
        if saved is None or m is None:
            continue
        current = m._parameters.get(attr) if attr in m._parameters else m._buffers.get(attr)
        if current is None or current.dim() != saved.dim() or current.shape == saved.shape:
            continue
        fresh = torch.empty_like(saved, dtype=current.dtype)
        if attr in m._parameters:
            setattr(m, attr, nn.Parameter(fresh, requires_grad=current.requires_grad))
        else:
            m._buffers[attr] = fresh


def load_checkpoint(path: Path, model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """Load weights into a freshly built `model` (reshaped to pruned shapes first). Returns (model, meta)."""
    blob = _read(path)
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        state, meta = blob.get("state_dict"), blob.get("meta", {})
        if not _is_state(state) or not isinstance(meta, dict):
            raise CheckpointError(f"{path}: corrupt {FORMAT} checkpoint (no state_dict of tensors, or bad meta)")
        meta = dict(meta)
        try:
            _reshape(model, blob.get("shapes", {}))
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: a checkpoint for another architecture: {exc}") from None
        _resize_tensors(model, state, blob.get("tensors", {}))
    elif _is_state(blob):
        state, meta = blob, {}
    elif isinstance(blob, dict) and _is_state(blob.get("state_dict")):
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
