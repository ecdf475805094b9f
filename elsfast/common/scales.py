"""Patch-size schedules P(t): a fixed size, a per-step list, a callable of t, or a published calibrated list.

The calibrated lists published with the paper's code ship as package data (`assets/reference_scales.json`,
copied from the authors' results): entry i belongs to t = i / 20. They are good defaults, not exact (SPEC
section 4: they may be offset by one step relative to the machine sampler).
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources

__all__ = ["PatchSizeSpec", "reference_scales", "resolve_patch_size"]

PatchSizeSpec = int | Sequence[int] | Callable[[float], int] | str


@cache
def reference_scales() -> dict[str, list[int]]:
    """The published calibrated P(t) lists, keyed `DATASET_ARCH_PADDING[_conditional]`."""
    text = resources.files("elsfast").joinpath("assets/reference_scales.json").read_text()
    return json.loads(text)["scales"]


def resolve_patch_size(spec: PatchSizeSpec, steps: int) -> Callable[[float, int], int]:
    """Turn a patch-size spec into `size(t, i)` for step i of `steps` (t = i / steps).

    - int: the same size at every step;
    - sequence of length `steps`: entry i at step i (t = i / steps), the layout of the published lists;
    - callable: `spec(t)`;
    - str: a published list by name; with `steps` other than its length, entry round(t * len) is used.
    """
    if isinstance(spec, str):
        scales = reference_scales()
        if spec not in scales:
            raise ValueError(f"patch_size: unknown calibrated scales {spec!r}; known: {', '.join(sorted(scales))}")
        table = scales[spec]
        if len(table) == steps:
            return lambda t, i: table[i]
        return lambda t, i: table[min(len(table) - 1, round(t * len(table)))]
    if callable(spec):
        return lambda t, i: spec(t)
    if isinstance(spec, numbers.Real):
        return lambda t, i: spec
    try:
        table = list(spec)
    except TypeError:
        raise TypeError(
            f"patch_size must be an odd int, a list of them, a callable of t or a scales name, got {spec!r}"
        ) from None
    if len(table) != steps:
        raise ValueError(f"patch_size: a patch-size list needs one entry per step ({steps}), got {len(table)}")
    return lambda t, i: table[i]
