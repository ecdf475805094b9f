"""Patch-size schedules P(t): a fixed size, a per-step list, a callable of t, or a published calibrated list.

The calibrated lists published with the paper's code ship as package data (`assets/reference_scales.json`,
copied from the authors' results). They are good defaults, not exact. Two readings of a list of n entries at
t = i / n (`READINGS`; SPEC section 4):

- `"published"` (the default): entry i, as the authors' machine sampler reads the lists;
- `"shifted"`: entry i - 1, one step of the t = i / n grid earlier. The authors' calibration loop stores the P it
  found for t = i / n at index i - 1, so this is the reading that gives each step the P calibrated for it. At the
  ends: t = 1 reads the last entry in both readings (the published one clips), and t = 0, which no sampler
  evaluates, reads entry 0 in both (the shifted one clips). On elsfast's grid (t = (n-1)/n ... 1/n) the shifted
  reading uses entries n-2 ... 0; on the authors' network grid (t = 1 ... 1/n) every entry once.

A published list is named `NAME` (the published reading) or `NAME:READING`, e.g. `"MNIST_ResNet_zeros:shifted"`,
anywhere a patch-size spec is taken (`elsfast.sample`, the diffusers and k-diffusion adapters, `elsfast compare`,
the CLI's `--scales`).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources

__all__ = [
    "READINGS",
    "PatchSizeSpec",
    "check_patch_size_spec",
    "parse_scales_name",
    "patch_size_at",
    "reference_scales",
    "resolve_patch_size",
]

PatchSizeSpec = int | Sequence[int] | Callable[[float], int] | str
READINGS = ("published", "shifted")  # how a list of n entries is read at t = i / n: entry i, or entry i - 1
_SHIFT = {"published": 0, "shifted": 1}  # steps of the t = i / n grid by which a reading looks back


@cache
def reference_scales() -> dict[str, list[int]]:
    """The published calibrated P(t) lists, keyed `DATASET_ARCH_PADDING[_conditional]`."""
    text = resources.files("elsfast").joinpath("assets/reference_scales.json").read_text()
    return json.loads(text)["scales"]


def parse_scales_name(text: str) -> tuple[str, str]:
    """`NAME` or `NAME:READING` -> (NAME, READING): a published list and its reading ("published" by default).

    Raises `ValueError` naming the known lists or readings when either is unknown.
    """
    name, sep, reading = text.partition(":")
    reading = reading if sep else "published"
    scales = reference_scales()
    if name not in scales:
        raise ValueError(f"unknown calibrated scales {name!r}; known: {', '.join(sorted(scales))}")
    if reading not in READINGS:
        raise ValueError(f"calibrated scales {text!r}: unknown reading {reading!r}; known: {', '.join(READINGS)}")
    return name, reading


def patch_size_at(spec: PatchSizeSpec, t: float, *, reading: str = "published") -> int:
    """The patch size of `spec` at time t in [0, 1]: the one reading of a patch-size spec.

    - int: that size at every t;
    - callable: `spec(t)`;
    - sequence, or the name of a published calibrated list (`reference_scales()`, `NAME` or `NAME:READING`):
      entry round(t * len) (reading "published"; a list of n entries used with n steps gives entry i at t = i / n)
      or round(t * len) - 1 (reading "shifted": one step of the t = i / len grid earlier), clipped to the list.
      A name's own reading wins over `reading`, which applies to lists (see the module docstring, `READINGS`).
    """
    if reading not in READINGS:
        raise ValueError(f"reading: expected one of {', '.join(READINGS)}, got {reading!r}")
    if isinstance(spec, str):
        try:
            name, reading = parse_scales_name(spec)
        except ValueError as err:
            raise ValueError(f"patch_size: {err}") from None
        spec = reference_scales()[name]
    if callable(spec):
        return spec(t)
    if isinstance(spec, numbers.Real) or (hasattr(spec, "dim") and spec.dim() == 0):
        return spec
    try:
        table = list(spec)
    except TypeError:
        raise TypeError(
            f"patch_size must be an odd int, a list of them, a callable of t or a scales name, got {spec!r}"
        ) from None
    if not table:
        raise ValueError("patch_size: a patch-size list must not be empty")
    return table[min(len(table) - 1, max(0, round(t * len(table)) - _SHIFT[reading]))]


def check_patch_size_spec(spec: PatchSizeSpec) -> None:
    """Check a patch-size spec before any step runs: an unknown name, an empty list or a wrong type (as
    `patch_size_at`), and any int or list entry that is not an odd positive integer, raise naming `patch_size`.
    A callable is checked when called (by the machine)."""
    if callable(spec):
        return
    patch_size_at(spec, 1.0)
    if isinstance(spec, str):
        spec = reference_scales()[parse_scales_name(spec)[0]]
    sizes = [spec] if isinstance(spec, numbers.Real) or (hasattr(spec, "dim") and spec.dim() == 0) else list(spec)
    for size in sizes:
        if isinstance(size, bool) or not (isinstance(size, numbers.Real) or hasattr(size, "dim")):
            raise TypeError(f"patch_size must be an odd positive integer, got {size!r}")
        if not math.isfinite(float(size)) or int(size) != size or int(size) < 1 or int(size) % 2 == 0:
            raise ValueError(f"patch_size must be an odd positive integer, got {size!r}")


def resolve_patch_size(spec: PatchSizeSpec, steps: int) -> Callable[[float, int], int]:
    """`patch_size_at` for a sampler of `steps` steps, as `size(t, i)` for step i (t = i / steps).

    A list given as a list must have one entry per step (entry i at step i, the layout of the published lists);
    a published list named by its string is read at round(t * len) (or one entry earlier, `NAME:shifted`) whatever
    `steps` is. The spec is checked here,
    before any step runs.
    """
    if not isinstance(spec, str) and not callable(spec) and not isinstance(spec, numbers.Real):
        try:
            table = list(spec)
        except TypeError:
            table = None
        if table is not None and len(table) != steps:
            raise ValueError(f"patch_size: a patch-size list needs one entry per step ({steps}), got {len(table)}")
    check_patch_size_spec(spec)  # an unknown name, an empty list, a wrong type or an even size fails here
    return lambda t, i: patch_size_at(spec, t)
