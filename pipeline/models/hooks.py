"""Run a model once with temporary forward hooks (removed whatever happens)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def run_hooked(model: nn.Module, example: torch.Tensor, hooks: Iterable[RemovableHandle]) -> None:
    """Run `model` on `example` in eval mode without gradients, then remove `hooks`."""
    handles = list(hooks)
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
