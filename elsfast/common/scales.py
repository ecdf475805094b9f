"""Patch-size schedules P(t): a fixed size, a per-step list, a callable of t, or a published calibrated list.

The calibrated lists published with the paper's code ship as package data (`assets/reference_scales.json`,
copied from the authors' results): entry i belongs to t = i / 20. They are good defaults, not exact (SPEC
section 4: they may be offset by one step relative to the machine sampler).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources

__all__ = ["PatchSizeSpec", "check_patch_size_spec", "patch_size_at", "reference_scales", "resolve_patch_size"]

PatchSizeSpec = int | Sequence[int] | Callable[[float], int] | str


@cache
def reference_scales() -> dict[str, list[int]]:
    """The published calibrated P(t) lists, keyed `DATASET_ARCH_PADDING[_conditional]`."""
    text = resources.files("elsfast").joinpath("assets/reference_scales.json").read_text()
    return json.loads(text)["scales"]


def patch_size_at(spec: PatchSizeSpec, t: float) -> int:
    """The patch size of `spec` at time t in [0, 1]: the one reading of a patch-size spec.

    - int: that size at every t;
    - callable: `spec(t)`;
    - sequence, or the name of a published calibrated list (`reference_scales()`): entry round(t * len),
      clipped to the list (a list of n entries used with n steps gives entry i at t = i / n).
    """
    if isinstance(spec, str):
        scales = reference_scales()
        if spec not in scales:
            raise ValueError(f"patch_size: unknown calibrated scales {spec!r}; known: {', '.join(sorted(scales))}")
        spec = scales[spec]
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
    return table[min(len(table) - 1, max(0, round(t * len(table))))]


def check_patch_size_spec(spec: PatchSizeSpec) -> None:
    """Check a patch-size spec before any step runs: an unknown name, an empty list or a wrong type (as
    `patch_size_at`), and any int or list entry that is not an odd positive integer, raise naming `patch_size`.
    A callable is checked when called (by the machine)."""
    if callable(spec):
        return
    patch_size_at(spec, 1.0)
    if isinstance(spec, str):
        spec = reference_scales()[spec]
    sizes = [spec] if isinstance(spec, numbers.Real) or (hasattr(spec, "dim") and spec.dim() == 0) else list(spec)
    for size in sizes:
        if isinstance(size, bool) or not (isinstance(size, numbers.Real) or hasattr(size, "dim")):
            raise TypeError(f"patch_size must be an odd positive integer, got {size!r}")
        if not math.isfinite(float(size)) or int(size) != size or int(size) < 1 or int(size) % 2 == 0:
            raise ValueError(f"patch_size must be an odd positive integer, got {size!r}")


def resolve_patch_size(spec: PatchSizeSpec, steps: int) -> Callable[[float, int], int]:
    """`patch_size_at` for a sampler of `steps` steps, as `size(t, i)` for step i (t = i / steps).

    A list given as a list must have one entry per step (entry i at step i, the layout of the published lists);
    a published list named by its string is read at round(t * len) whatever `steps` is. The spec is checked here,
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
