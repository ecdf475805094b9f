"""The probability-flow ODE of a machine in the paper's VP conventions (SPEC section 1), and an Euler integrator.

Derivation. The forward process `x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eta` is the marginal of the
variance-preserving SDE

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,    beta(t) = -d ln abar(t) / dt  (> 0: abar decreases in t),

because its mean obeys m' = -beta/2 m, so m(t) = sqrt(abar(t)) x_0, and its variance v' = -beta v + beta, so
1 - v(t) = abar(t) (1 - v(0)) = abar(t). For an SDE dx = f dt + g dW, Song et al. (2021, eq. 13) give the
probability-flow ODE dx/dt = f - g^2/2 * score with the same marginals, here

    dx/dt = -1/2 beta(t) (x + score(x, t)),    score = (sqrt(abar) D - x) / (1 - abar).

Since x + score = sqrt(abar) (D - sqrt(abar) x) / (1 - abar), the velocity is computed as
`-1/2 beta sqrt(abar) (D - sqrt(abar) x) / (1 - abar)`, where `beta sqrt(abar)` stays bounded as abar -> 0
(for the legacy cosine it is 2c sin(ct), c = pi / 2.016). Check: for a one-image training set (D = phi) the ODE
is solved by x(t) = sqrt(abar) phi + sqrt(1 - abar) eps for any fixed eps; `tests/test_ode.py` checks this.

The ODE is integrated backwards in t (dt < 0) from noise at t near 1. The DDIM sampler (`elsfast.sampling`) is a
first-order discretisation of the same ODE (it is exactly Euler's method in the variables sigma = sqrt((1 -
abar) / abar) and x / sqrt(abar)), so `euler_sample` and `elsfast.sample` converge to the same images as the step
counts grow.

Patch sizes P(t) are read by `elsfast.common.scales.patch_size_at`, as the DDIM sampler reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..common.checks import labels_per_sample
from ..common.scales import PatchSizeSpec, patch_size_at
from ..common.schedules import beta, get_schedule
from ..machine import ScoreMachine

__all__ = ["euler_sample", "score", "velocity"]

Schedule = str | Callable[[float], float]


def _abar(t: float, schedule: Schedule) -> float:
    abar = get_schedule(schedule)(float(t))
    if not 0.0 < abar < 1.0:
        raise ValueError(f"abar(t = {t}) = {abar} must lie strictly between 0 and 1 (choose t inside (0, 1))")
    return abar


def score(
    machine: ScoreMachine,
    x: torch.Tensor,
    t: float,
    *,
    patch_size: PatchSizeSpec = 3,
    labels=None,
    schedule: Schedule = "cosine-legacy",
) -> torch.Tensor:
    """The machine's score `(sqrt(abar) D - x) / (1 - abar)` at time t (abar = abar(t) of `schedule`) for x
    `[B, C, H, W]`; `labels` is one int or one per sample. Returns the dtype and device of x."""
    abar = _abar(t, schedule)
    size = patch_size_at(patch_size, float(t))
    return machine.score(x, abar, size, labels_per_sample(labels, x.shape[0]))


def _velocity(machine, x, t, size, labels, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    abar = _abar(t, schedule)
    d = machine.denoise(x, abar, size, labels)
    a = math.sqrt(abar)
    v = (-0.5 * beta(t, schedule) * a / (1.0 - abar)) * (d - a * x.to(d))
    return v, d


def velocity(
    machine: ScoreMachine,
    x: torch.Tensor,
    t: float,
    *,
    patch_size: PatchSizeSpec = 3,
    labels=None,
    schedule: Schedule = "cosine-legacy",
) -> torch.Tensor:
    """The probability-flow velocity dx/dt = -1/2 beta(t) (x + score(x, t)) (module docstring: derivation)."""
    size = patch_size_at(patch_size, float(t))
    return _velocity(machine, x, float(t), size, labels_per_sample(labels, x.shape[0]), schedule)[0]


def euler_sample(
    machine: ScoreMachine,
    x: torch.Tensor,
    steps: int = 100,
    *,
    t_start: float = 1.0,
    t_min: float = 0.01,
    patch_size: PatchSizeSpec = 3,
    labels=None,
    schedule: Schedule = "cosine-legacy",
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE with `steps` Euler steps from noise `x` `[B, C, H, W]` placed at
    `t_start` down to `t_min` on a uniform grid in t, then return the machine's x0 prediction at `t_min`
    (`steps + 1` machine evaluations).

    No randomness is drawn: pass the initial noise (e.g. `torch.randn(..., generator=g)`). Near t = 0 the ODE is
    stiff (its rate grows like 1/t), so Euler needs a step h below about 2 t_min: steps >= (t_start - t_min) /
    (2 t_min). abar(t_start) must be positive (both named schedules are, at t = 1, in floating point).
    `callback` receives after every step a dict with `i`, `t`, `abar`, `x` (the new state) and `denoised`.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < t_min < t_start <= 1.0:
        raise ValueError(f"need 0 < t_min < t_start <= 1, got t_min={t_min}, t_start={t_start}")
    labels = labels_per_sample(labels, x.shape[0])
    x = x.to(machine.device, machine.dtype)
    h = (t_start - t_min) / steps
    for i in tqdm(range(steps), desc="euler", disable=not progress, leave=False):
        t = t_start - i * h
        v, d = _velocity(machine, x, t, patch_size_at(patch_size, t), labels, schedule)
        x = x - h * v
        if callback is not None:
            callback({"i": i, "t": t, "abar": get_schedule(schedule)(t), "x": x, "denoised": d})
    return machine.denoise(x, _abar(t_min, schedule), patch_size_at(patch_size, t_min), labels)
