"""Argument checks shared by the API and the command line, so both accept and refuse the same things.

- `parse_memory_budget`: bytes as an int or a string with a binary suffix ("512M", "2G", "1.5GiB").
- `integer_labels`: class labels that are integers (never truncated floats); `labels_per_sample`: one per sample.
- `check_pixel_range`: float images in the [-1, 1] convention, with a warning for images that look like [0, 1].
- `check_device`: a torch device that exists here (`"auto"`: CUDA when available, else the CPU).
- `check_abar`: a noise level strictly between 0 and 1.
- `check_finite_input`: float inputs with no NaN/inf and no value so large that squared distances overflow.
- `check_compute_tensor`: a float32/float64 torch tensor of a given rank (the compute dtypes).
- `check_seed`: an integer seed in torch's range.
- `check_channels_first`: `[N, C, H, W]` images that do not look channels-last (`[N, H, W, 1 or 3]`).
"""

from __future__ import annotations

import math
import numbers
import re
import warnings

import torch

__all__ = [
    "check_abar",
    "check_channels_first",
    "check_compute_tensor",
    "check_device",
    "check_finite_input",
    "check_pixel_range",
    "check_seed",
    "integer_labels",
    "labels_per_sample",
    "largest_input",
    "parse_bytes",
    "parse_memory_budget",
]

_BYTES = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

PIXEL_TOLERANCE = 1e-4
"""How far outside [-1, 1] float pixels may lie (rounding of a conversion) before they are refused."""


def parse_bytes(text: str) -> int:
    """A byte count with an optional binary suffix: `1048576`, `512K`, `512M`, `2G`, `1.5GiB` (K = 1024).
    ValueError for anything else, and for counts below one byte."""
    m = _BYTES.match(text)
    if m is None:
        raise ValueError(f"expected a byte count such as 536870912, 512M or 2G, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise ValueError(f"the byte count must be positive, got {text!r}")
    return value


def parse_memory_budget(value: int | str) -> int:
    """`memory_budget` in bytes from a positive int or a string understood by `parse_bytes` ("512M", "2G").

    ValueError naming `memory_budget` for 0, negative or unparsable values; TypeError for other types (bool and
    float included: a float would be a byte count with a fraction).
    """
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except ValueError as err:
            raise ValueError(f"memory_budget: {err}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"memory_budget must be an int (bytes) or a string such as '512M', got {value!r}")
    if value < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes (e.g. 512 << 20 or '512M'), got {value}")
    return value


def integer_labels(labels, name: str = "labels") -> torch.Tensor:
    """`labels` (an int, a sequence or a tensor) as an int64 CPU tensor, flattened to 1-D only if it is 0-D.

    Non-integer values raise ValueError naming `name` (`1.9` is not class 1); booleans and non-numeric values
    raise TypeError. Integral floats (`2.0`) are accepted.
    """
    if isinstance(labels, bool):
        raise TypeError(f"{name} must be integers, got a bool")
    try:
        tensor = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {labels!r}") from None
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"{name} must be integers, got {tensor.dtype}")
    if tensor.is_floating_point():
        bad = tensor[~torch.isfinite(tensor) | (tensor != tensor.round())]
        if bad.numel():
            raise ValueError(f"{name} must be integers (class indices), got {bad.flatten()[0].item():.6g}")
    return tensor.to(torch.int64).cpu()


def labels_per_sample(labels, n: int) -> torch.Tensor | None:
    """`labels` (one class for every sample, or one per sample) as int64 `[n]`, or None. Non-integer labels
    raise ValueError (1.7 is not class 1), a count other than 1 or `n` raises ValueError."""
    if labels is None:
        return None
    labels = integer_labels(labels, "labels")
    if labels.dim() == 0:
        return labels.expand(n).clone()
    labels = labels.flatten()
    if labels.numel() != n:
        raise ValueError(f"labels must be one int or {n} ints (one per sample), got {labels.numel()}")
    return labels


def check_pixel_range(images: torch.Tensor, name: str, *, warn: bool = True) -> None:
    """Check float `images` (any shape) against the [-1, 1] pixel convention.

    NaN/inf, or values outside [-1, 1] by more than `PIXEL_TOLERANCE`, raise ValueError naming `name`, the range
    found and the fix; non-constant float images within [0, 1] (the look of `imgs.float() / 255`) give a
    UserWarning with the fix (`x * 2 - 1`) unless `warn=False`. uint8 images are not checked (they map to
    [-1, 1] by construction).
    """
    if images.dtype == torch.uint8 or images.numel() == 0:
        return
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.0 - PIXEL_TOLERANCE or hi > 1.0 + PIXEL_TOLERANCE:
        hint = " (uint8-like values: pass the uint8 tensor itself)" if hi > 2.0 and lo >= 0 else ""
        raise ValueError(
            f"float {name} must lie in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}; rescale them, e.g. "
            "x / x.abs().max() for signed data, or pass uint8 images"
        )
    if warn and 0.0 <= lo < hi <= 1.0 + PIXEL_TOLERANCE:
        warnings.warn(
            f"float {name} lie in [{lo:.3g}, {hi:.3g}] with no negative value: they look like [0, 1] images, but "
            f"elsfast's pixels are in [-1, 1] (black = -1); pass {name} * 2 - 1 (or the uint8 images)",
            UserWarning,
            stacklevel=3,
        )


def check_device(device: torch.device | str | None, *, name: str = "device") -> torch.device | None:
    """`device` as a `torch.device` that exists here (None stays None; the caller's default applies).

    `"auto"` (any case) means CUDA when it is available, else the CPU: the one place that choice is made, for the
    API, the trainer and the command line. ValueError starting with `name` (the CLI passes `"argument --device"`)
    for a string that is not a torch device, a CUDA device without CUDA, an index beyond the device count, MPS
    where it is not available, or the meta device (which holds no data).
    """
    if device is None:
        return None
    use = "device='cpu'" if name == "device" else f"{name.removeprefix('argument ')} cpu"
    if isinstance(device, str):
        device = device.strip()
        if device.lower() == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name}: not a torch device: {device!r} (try 'cpu', 'cuda' or 'auto')") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: CUDA was asked for, but no CUDA device is available here (use {use})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name}: MPS is not available here (use {use})")
    elif device.type == "meta":
        raise ValueError(f"{name}: the meta device holds no data, and a machine computes from its training images")
    return device


def check_abar(abar: float | torch.Tensor) -> float:
    """`abar` (a real number or a one-element tensor) as a float strictly between 0 and 1; TypeError/ValueError
    naming `abar` otherwise."""
    if isinstance(abar, torch.Tensor):
        if abar.numel() != 1:
            raise ValueError(f"abar must be a single number, got a tensor of shape {tuple(abar.shape)}")
        abar = abar.item()
    if isinstance(abar, bool) or not isinstance(abar, numbers.Real):
        raise TypeError(f"abar must be a number strictly between 0 and 1, got {abar!r}")
    abar = float(abar)
    if not (0.0 < abar < 1.0):
        raise ValueError(f"abar must lie strictly between 0 and 1, got {abar}")
    return abar


def largest_input(dtype: torch.dtype) -> float:
    """The largest magnitude a float input of `dtype` may hold: the fourth root of the dtype's largest number
    (float32: 4.3e9), so that squared distances between inputs, divided by the smallest temperature, stay finite."""
    return math.sqrt(math.sqrt(torch.finfo(dtype).max))


def check_finite_input(values: torch.Tensor, name: str) -> None:
    """ValueError naming `name` when float `values` hold NaN, infinities, or magnitudes above `largest_input`
    (1e38 in float32 is finite, but its squared distances are not)."""
    if values.numel() == 0:
        return
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    big = values.abs().max().item()
    if big > largest_input(values.dtype):
        raise ValueError(
            f"{name} holds values up to {big:.3g}, beyond the largest {str(values.dtype).removeprefix('torch.')} "
            f"input whose squared distances stay finite ({largest_input(values.dtype):.3g}); rescale it"
        )


def check_compute_tensor(value, name: str, shape: str) -> torch.Tensor:
    """`value` if it is a float32/float64 torch tensor with as many dimensions as `shape` names (e.g. "(G, M, D)");
    TypeError naming `name` for other types and dtypes (numpy arrays, integers, float16/bfloat16: convert with
    `torch.as_tensor(...).float()`), ValueError for another rank."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor {shape} of float32 or float64, got {type(value).__name__}")
    rank = shape.count(",") + 1
    if value.dim() != rank:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    if value.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{name} must be float32 or float64 (the compute dtypes), got {str(value.dtype).removeprefix('torch.')}"
        )
    return value


SEED_RANGE = (-(2**63), 2**64 - 1)
"""The seeds `torch.Generator.manual_seed` takes (inclusive)."""


def check_seed(seed, name: str = "seed") -> int:
    """`seed` as an int in `SEED_RANGE`; TypeError naming `name` for non-integers (strings, 1.5, bools),
    ValueError for integers outside the range (2**70)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {seed!r}")
    lo, hi = SEED_RANGE
    if not lo <= int(seed) <= hi:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64 - 1] (torch's seeds), got {seed}")
    return int(seed)


def check_channels_first(images: torch.Tensor, name: str) -> None:
    """ValueError naming `name` when 4-D `images` look channels-last: the last axis is 1 or 3 (grey, RGB) and
    the second is larger than 4 (more channels than grey, grey + alpha, RGB or RGBA have), as `[N, 28, 28, 1]`."""
    if images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] > 4:
        raise ValueError(
            f"{name} of shape {list(images.shape)} look channels-last [N, H, W, C]; elsfast takes [N, C, H, W]: "
            f"pass {name}.permute(0, 3, 1, 2)"
        )
