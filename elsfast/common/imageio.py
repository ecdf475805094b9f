"""Turning samples into pictures and files: uint8 conversion, image grids, atomic PNG / tensor writes.

Samples are float tensors `[N, C, H, W]` in [-1, 1] (the units of `elsfast.sample`). Every writer here goes
through `elsfast.common.fileio.atomic_write`: a temporary file renamed over the destination, so an
interrupted run never leaves a half-written file behind, and an existing file elsfast did not write is refused
(`FileExistsError`), never replaced.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_write, describe_file, open_npz

__all__ = ["SAMPLE_SUFFIXES", "load_samples", "make_grid", "save_grid", "save_samples", "to_uint8"]

SAMPLE_SUFFIXES = (".pt", ".npz")
"""File suffixes `save_samples` understands: `.pt` (torch.save) and `.npz` (numpy, key `samples`)."""


def _as_tensor(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {list(images.shape)}")
    return images.detach().cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images `[N, C, H, W]` in [-1, 1] -> uint8 `[N, H, W, C]` (channels last).

    Values are clamped to [-1, 1] and mapped by round((x + 1) * 127.5) with halves rounded up, so -1 -> 0,
    0 -> 128 and 1 -> 255. NaN counts as 0 (mid grey). uint8 input is passed through, only transposed.
    """
    images = _as_tensor(images)
    if images.dtype == torch.uint8:
        return images.permute(0, 2, 3, 1).contiguous().numpy()
    if not images.is_floating_point():
        raise ValueError(f"images must be float (or uint8), got {images.dtype}")
    x = torch.nan_to_num(images.to(torch.float64), nan=0.0).clamp(-1.0, 1.0)
    u = torch.floor((x + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(
    images: torch.Tensor,
    nrow: int | None = None,
    padding: int = 2,
    scale: int = 1,
    pad_value: int = 255,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> np.ndarray:
    """Tile images `[N, C, H, W]` (float in [-1, 1], or uint8) into one uint8 picture `[H', W', C]`.

    `nrow` images go in each row (default ceil(sqrt(N))), so there are ceil(N / nrow) rows. Every image is
    first upscaled `scale` times by nearest neighbour (so a 28 x 28 digit becomes 28 * scale pixels wide);
    `padding` pixels of `pad_value` then surround every tile, borders included:

        H' = rows * (H * scale + padding) + padding,   W' = nrow * (W * scale + padding) + padding.

    C is kept: 1 (grey) or 3 (RGB). Empty cells of the last row are `pad_value`.

    Float images are read in `value_range` (lo, hi): lo is black (0), hi white (255), values outside are
    clipped. The default (-1, 1) is the units of `elsfast.sample`; pass `value_range=(0, 1)` for images a diffusers
    pipeline returns with `output_type="pt"` (like torchvision's `save_image(..., normalize=True,
    value_range=(lo, hi))`). uint8 images are used as they are.
    """
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be two finite numbers lo < hi, got {value_range!r}")
    images = _as_tensor(images)
    if images.is_floating_point() and (lo, hi) != (-1.0, 1.0):
        images = (images.to(torch.float64) - lo) * (2.0 / (hi - lo)) - 1.0
    u = to_uint8(images)
    n, h, w, c = u.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image, got N = 0")
    if c not in (1, 3):
        raise ValueError(f"make_grid needs 1 (grey) or 3 (RGB) channels, got C = {c}")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or int(nrow) != nrow or nrow < 1:
        raise ValueError(f"nrow must be a positive integer, got {nrow!r}")
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if isinstance(padding, bool) or int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be a non-negative integer, got {padding!r}")
    if not 0 <= int(pad_value) <= 255:
        raise ValueError(f"pad_value must lie in [0, 255], got {pad_value}")
    nrow, scale, padding = int(nrow), int(scale), int(padding)
    if scale > 1:
        u = u.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = u[k]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, **kw) -> Path:
    """Write `make_grid(images, **kw)` (images `[N, C, H, W]`, C = 1 or 3) as a PNG at `path`, atomically.

    Float images are expected in [-1, 1] (`elsfast.sample`'s units: -1 black, 1 white); for another range pass
    `value_range=(lo, hi)`, e.g. `(0, 1)` for a diffusers pipeline's `output_type="pt"` images. The other keywords
    (`nrow`, `padding`, `scale`, `pad_value`) are `make_grid`'s. `path` must end in `.png`; its directory is
    created if needed. Returns the path written.
    """
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"grid images are written as PNG: the path must end in .png, got {str(path)!r}")
    grid = make_grid(images, **kw)
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)  # uint8: mode L or RGB
    return atomic_write(path, lambda f: picture.save(f, format="PNG"), kind="grid")


def save_samples(images: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write raw samples `[N, C, H, W]` (float, unchanged) atomically, in the format named by `path`'s suffix:

    - `.pt`: `torch.save` of the CPU tensor;
    - `.npz`: `np.savez` with the array under the key `samples`.

    Any other suffix raises ValueError. The directory is created if needed. Returns the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAMPLE_SUFFIXES:
        raise ValueError(
            f"cannot tell the sample file format from {str(path)!r}: use a {' or '.join(SAMPLE_SUFFIXES)} suffix"
        )
    images = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(images)
    if suffix == ".pt":
        return atomic_write(path, lambda f: torch.save(images, f), kind="samples")
    array = images.numpy()
    return atomic_write(path, lambda f: np.savez(f, samples=array), kind="samples")


def load_samples(path: str | os.PathLike) -> torch.Tensor:
    """Read samples written by `save_samples` (`.pt` or `.npz`) back as a tensor `[N, C, H, W]`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch's own message would suggest weights_only=False: never do that for a stranger's file
            raise ValueError(
                f"{path} cannot be read as samples (a tensor saved by torch.save): it looks like {describe_file(path)}"
            ) from None
    if suffix == ".npz":
        with open_npz(path) as data:
            if "samples" not in data.files:
                raise ValueError(f"{path} has no 'samples' array (arrays: {', '.join(data.files) or 'none'})")
            return torch.from_numpy(data["samples"])
    raise ValueError(f"cannot tell the sample file format from {str(path)!r}: use a .pt or .npz suffix")
