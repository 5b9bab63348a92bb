"""What a pruned model is measured with while decisions are made: BatchNorm statistics re-estimated on
training images, then loss and accuracy on validation batches.

Pruning a group removes input channels of the next layer, so the BatchNorm statistics after it no longer
describe what it sees; re-estimating them (a forward pass over a few hundred training images, no gradient)
recovers much of the accuracy lost before any fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor | None]  # normalized NCHW images, int64 labels (None: unlabelled)


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _on(x: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return x if device is None or x.device == torch.device(device) else x.to(device, non_blocking=True)


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
        for x, _ in batches:
            model(_on(x, device))
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
    for x, y in batches:
        x = _on(x, device)
        logits = model(x).float()
        if y is None:
            if reference is None:
                raise ValueError("unlabelled batches need a reference model")
            y = reference.eval()(x).argmax(1)
        else:
            y = _on(y, device)
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(x)
    return (total_loss / n, correct / n) if n else (float("nan"), float("nan"))
