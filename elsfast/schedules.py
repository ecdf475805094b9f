"""Noise schedules abar(t) on t in [0, 1] (SPEC section 1).

`cosine-legacy` is the schedule of the paper's code, abar(t) = cos^2(pi/2 * t / 1.008); it has abar(0) = 1 and
abar(1) = cos^2(pi/2 / 1.008) ~ 3.9e-5. `cosine` is the improved-DDPM cosine (Nichol & Dhariwal 2021),
abar(t) = f(t) / f(0) with f(t) = cos^2(pi/2 * (t + 0.008) / 1.008); it reaches abar(1) = 0 exactly, which the
sampler never evaluates (it starts at t = (n-1)/n).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["SCHEDULES", "abar_cosine", "abar_cosine_legacy", "get_schedule"]

_S = 0.008


def abar_cosine_legacy(t: float) -> float:
    """abar(t) = cos^2(pi/2 * t / 1.008), the schedule the paper's networks were trained with."""
    return math.cos(math.pi / 2 * t / (1 + _S)) ** 2


def abar_cosine(t: float) -> float:
    """Improved-DDPM cosine: cos^2(pi/2 * (t + s) / (1 + s)), normalised by its value at t = 0 (s = 0.008)."""
    f0 = math.cos(math.pi / 2 * _S / (1 + _S)) ** 2
    return math.cos(math.pi / 2 * (t + _S) / (1 + _S)) ** 2 / f0


SCHEDULES: dict[str, Callable[[float], float]] = {
    "cosine-legacy": abar_cosine_legacy,
    "cosine": abar_cosine,
}


def get_schedule(schedule: str | Callable[[float], float]) -> Callable[[float], float]:
    """Return abar(t) for a schedule name (see `SCHEDULES`) or pass a callable through."""
    if callable(schedule):
        return schedule
    try:
        return SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}") from None
