"""The pixel convention of SPEC section 1: images are floats in [-1, 1]; uint8 u maps to u / 127.5 - 1."""

from __future__ import annotations

import torch

__all__ = ["to_float"]


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint8 pixels to `dtype` in [-1, 1] (0 -> -1.0, 255 -> 1.0); cast float tensors to `dtype` (the same
    object when it already has it). Any shape, typically `[N, C, H, W]`; other dtypes raise TypeError."""
    if images.dtype == torch.uint8:
        return images.to(dtype).div_(127.5).sub_(1.0)
    if images.is_floating_point():
        return images.to(dtype)
    raise TypeError(f"to_float expects a uint8 or floating-point tensor, got {images.dtype}")
