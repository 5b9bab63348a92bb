"""TFLite's int8 scheme, simulated in PyTorch (fake quantization with a straight-through gradient).

- weights: per output channel, symmetric, range [-127, 127], scale = max |w| / 127 (what the TFLite converter
  does for CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED with per-channel quantization);
- activations: per tensor, asymmetric, range [-128, 127], scale = (max - min) / 255 over a range that
  always contains 0, zero point rounded into range.
"""

from __future__ import annotations

import torch
from torch import nn


def weight_channel_axis(mod: nn.Module) -> int:
    """Axis of the output channels of a Conv/Linear weight as TFLite quantizes it (depthwise: per channel too)."""
    return 1 if isinstance(mod, nn.ConvTranspose2d) else 0


def fake_quant_weight(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """Per-channel symmetric int8 fake quantization of `w` (straight-through gradient)."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims, keepdim=True).clamp_min(1e-12)
    scale = amax / 127.0
    q = torch.clamp(torch.round(w / scale), -127, 127) * scale
    return w + (q - w).detach()


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of a per-tensor asymmetric int8 range [lo, hi] (widened to contain 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    zp = round(-128 - lo / scale)
    return scale, max(-128, min(127, zp))


def fake_quant_act(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-tensor asymmetric int8 fake quantization of `x` over [lo, hi] (straight-through inside the range)."""
    scale, zp = act_qparams(lo, hi)
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, -128, 127)
