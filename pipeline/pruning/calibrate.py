"""What a pruned model is measured with while decisions are made: BatchNorm statistics re-estimated on
training images, then loss and accuracy on validation batches.

Pruning a group removes input channels of the next layer, so the BatchNorm statistics after it no longer
describe what it sees; re-estimating them (a forward pass over a few hundred training images, no gradient)
recovers much of the accuracy lost before any fine-tuning.

Where they run: `device=` on each call, or, for every call inside `with decisions_on(device):` (the
sensitivity and prune stages set it from `finetune.device`), that device. The model (and the reference) are
moved there for the call and back afterwards, and each batch is moved as it is read, so callers keep CPU
models and CPU batches (pruning itself, Torch-Pruning's graph surgery, stays on the CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor | None]  # normalized NCHW images, int64 labels (None: unlabelled)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


_DECISIONS: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("decisions_on", default=None)


@contextlib.contextmanager
def decisions_on(device: torch.device | str | None) -> Iterator[None]:
    """Every `evaluate` and `recalibrate_bn` inside runs on `device` (None or the CPU: where the model is)."""
    token = _DECISIONS.set(None if device is None else torch.device(device))
    try:
        yield
    finally:
        _DECISIONS.reset(token)


def decision_device() -> torch.device | None:
    return _DECISIONS.get()


def _on(x: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return x if device is None or x.device == torch.device(device) else x.to(device, non_blocking=True)


def _home(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


@contextlib.contextmanager
def _placed(device: torch.device | str | None, *models: nn.Module | None) -> Iterator[torch.device | None]:
    """The models on `device` (or the `decisions_on` device) for the block, back where they were after."""
    dev = torch.device(device) if device is not None else _DECISIONS.get()
    moved = [(m, _home(m)) for m in models if m is not None and dev is not None and _home(m) != dev]
    for m, _ in moved:
        m.to(dev)
    try:
        yield dev
    finally:
        for m, home in moved:
            m.to(home)


@torch.no_grad()
def pseudo_labelled(batches: Sequence[Batch], reference: nn.Module, *, device: torch.device | str | None = None
                    ) -> list[Batch]:  # fmt: skip
    """`batches` with each unlabelled one labelled by `reference`'s top-1 (computed once, on the CPU beside the
    images): `evaluate` then scores agreement without running the reference again for every model it scores.
    Labelled batches are kept as they are."""
    out: list[Batch] = []
    with _placed(device, reference) as dev:
        reference.eval()
        for x, y in batches:
            out.append((x, y if y is not None else reference(_on(x, dev)).argmax(1).to(x.device)))
    return out


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[Batch], *, device: torch.device | str | None = None
                   ) -> nn.Module:  # fmt: skip
    """Re-estimate every BatchNorm's running mean and variance on `batches` (a cumulative average over all of
    them), in place; the rest of the model stays in eval mode. Returns the model, in eval mode. `device`: where
    the model is (each batch is moved there; None: the batches' own device, the CPU by default)."""
    bns = batchnorms(model)
    if not bns or not batches:
        return model.eval()
    momentum = {m: m.momentum for m in bns}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    try:
        with _placed(device, model) as dev:
            for x, _ in batches:
                model(_on(x, dev))
    finally:
        for m in bns:
            m.momentum = momentum[m]
        model.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch], *, reference: nn.Module | None = None,
             device: torch.device | str | None = None) -> tuple[float, float]:  # fmt: skip
    """(mean loss, accuracy) of `model` on `batches`: cross-entropy against the labels, or, for unlabelled
    batches, against the top-1 class of `reference` (the unpruned model), accuracy then being agreement.
    `device`: where the model (and reference) are; each batch is moved there (None: as the batches are)."""
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with _placed(device, model, reference) as dev:
        for x, y in batches:
            x = _on(x, dev)
            logits = model(x).float()
            if y is None:
                if reference is None:
                    raise ValueError("unlabelled batches need a reference model")
                y = reference.eval()(x).argmax(1)
            else:
                y = _on(y, dev)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(x)
    return (total_loss / n, correct / n) if n else (float("nan"), float("nan"))
