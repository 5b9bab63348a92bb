"""Quantization that keeps accuracy: per-op int8 error, and the remedies applied in order until the int8 model
agrees with PyTorch on `quantize.min_agreement` of the validation images (see pipeline/quantize/remedies.py)."""
