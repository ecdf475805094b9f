"""Noise schedules abar(t) on t in [0, 1] (SPEC section 1).

`cosine-legacy` is the schedule of the paper's code, abar(t) = cos^2(pi/2 * t / 1.008); it has abar(0) = 1 and
abar(1) = cos^2(pi/2 / 1.008) = 1.554e-4. `cosine` is the improved-DDPM cosine (Nichol & Dhariwal 2021),
abar(t) = f(t) / f(0) with f(t) = cos^2(pi/2 * (t + 0.008) / 1.008); it reaches abar(1) = 0 exactly, which the
sampler never evaluates (it starts at t = (n-1)/n).
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "SCHEDULES",
    "abar_cosine",
    "abar_cosine_legacy",
    "beta",
    "get_schedule",
    "schedule_name",
    "t_of_abar",
    "x0_from_eps",
]

_S = 0.008
_C = math.pi / 2 / (1 + _S)  # abar(t) = cos^2(C t) (legacy) or cos^2(C (t + s)) / cos^2(C s) (cosine)


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


def schedule_name(schedule: str | Callable[[float], float]) -> str:
    """How a schedule is recorded in result files: its name, or the `repr` of a callable."""
    return schedule if isinstance(schedule, str) else repr(schedule)


def t_of_abar(abar: float, schedule: str | Callable[[float], float] = "cosine-legacy") -> float:
    """The time t in [0, 1] with abar(t) = abar (analytic for the named schedules, bisection for a callable,
    which must decrease in t); abar outside the schedule's range gives the nearest end, 0 or 1."""
    abar = float(abar)
    if schedule == "cosine-legacy" or schedule is abar_cosine_legacy:
        t = math.acos(math.sqrt(min(1.0, max(0.0, abar)))) / _C
    elif schedule == "cosine" or schedule is abar_cosine:
        t = math.acos(math.sqrt(min(1.0, max(0.0, abar))) * math.cos(_C * _S)) / _C - _S
    else:
        abar_of = get_schedule(schedule)
        lo, hi = 0.0, 1.0
        for _ in range(64):  # abar(lo) >= abar >= abar(hi)
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if abar_of(mid) > abar else (lo, mid)
        t = (lo + hi) / 2
    return min(1.0, max(0.0, t))


def beta(t: float, schedule: str | Callable[[float], float] = "cosine-legacy") -> float:
    """beta(t) = -d ln abar / dt: analytic for the named schedules, a central difference for a callable."""
    if schedule == "cosine-legacy" or schedule is abar_cosine_legacy:
        return 2 * _C * math.tan(_C * t)
    if schedule == "cosine" or schedule is abar_cosine:
        return 2 * _C * math.tan(_C * (t + _S))
    abar_of = get_schedule(schedule)
    h = 1e-6
    lo, hi = max(0.0, t - h), min(1.0, t + h)
    return -(math.log(abar_of(hi)) - math.log(abar_of(lo))) / (hi - lo)


def x0_from_eps(x, eps, abar: float):
    """The clean image a noise prediction implies: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), for x = sqrt(abar)
    x0 + sqrt(1 - abar) eps (tensors of one shape, or numbers; abar in (0, 1])."""
    return (x - math.sqrt(max(0.0, 1.0 - abar)) * eps) / math.sqrt(abar)
