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

Divergence. The density of x(t) changes along the flow by d log p / dt = -div v (the instantaneous change of
variables), so `divergence`, the trace of the velocity's Jacobian, turns the ODE into log-likelihoods of images
under a machine. Since v = -1/2 beta sqrt(abar) (D - sqrt(abar) x) / (1 - abar),

    div v = -1/2 beta sqrt(abar) (tr dD/dx - sqrt(abar) C H W) / (1 - abar),

and tr dD/dx is exact: the machine's gradients are exact (`elsfast.reduce.grad`), and the trace is read off the
Jacobian's diagonal, one coordinate per copy of the batch, not estimated (Hutchinson).
`log_likelihood` integrates x and the divergence together from t_min up to t_max (Heun's method) and adds the
prior's log density at x(t_max): log p_tmin(x) = log p_tmax(x(t_max)) + int_tmin^tmax div v dt, the only errors
being the integrator's and the prior's (a standard normal by default, the sampler's starting distribution).

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

__all__ = ["divergence", "euler_sample", "log_likelihood", "score", "velocity"]

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


def divergence(
    machine: ScoreMachine,
    x: torch.Tensor,
    t: float,
    *,
    patch_size: PatchSizeSpec = 3,
    labels=None,
    schedule: Schedule = "cosine-legacy",
    coordinates_per_call: int = 64,
) -> torch.Tensor:
    """The exact divergence of the probability-flow velocity at time t, `[B]` (machine dtype), for x
    `[B, C, H, W]`: the trace of dv/dx (module docstring). The machine's Jacobian diagonal is read from
    vector-Jacobian products, `coordinates_per_call` pixel coordinates at once (each a copy of the batch: a call
    denoises up to `coordinates_per_call * B` images), so the cost is about C H W / `coordinates_per_call` machine
    calls and their backward passes. Needs an exact backend (`NotDifferentiable` otherwise)."""
    if isinstance(coordinates_per_call, bool) or not isinstance(coordinates_per_call, int) or coordinates_per_call < 1:
        raise ValueError(f"coordinates_per_call must be a positive int, got {coordinates_per_call!r}")
    t = float(t)
    abar = _abar(t, schedule)
    size = patch_size_at(patch_size, t)
    labels = labels_per_sample(labels, x.shape[0])
    x = x.detach().to(machine.device, machine.dtype)
    B, n = x.shape[0], x[0].numel()
    trace = torch.zeros(B, dtype=x.dtype, device=x.device)
    for start in range(0, n, coordinates_per_call):
        coords = torch.arange(start, min(n, start + coordinates_per_call), device=x.device)
        k = coords.numel()
        copies = x.unsqueeze(0).expand(k, *x.shape).reshape(k * B, *x.shape[1:]).clone().requires_grad_()
        with torch.enable_grad():
            d = machine.denoise(copies, abar, size, None if labels is None else labels.repeat(k))
            picked = d.reshape(k, B, n).gather(2, coords.view(k, 1, 1).expand(k, B, 1))  # copy i: coordinate i
            (grad,) = torch.autograd.grad(picked.sum(), copies)
        trace += grad.reshape(k, B, n).gather(2, coords.view(k, 1, 1).expand(k, B, 1)).sum(dim=(0, 2))
    a = math.sqrt(abar)
    return (-0.5 * beta(t, schedule) * a / (1.0 - abar)) * (trace - a * n)


def log_likelihood(
    machine: ScoreMachine,
    x: torch.Tensor,
    steps: int = 100,
    *,
    t_min: float = 0.01,
    t_max: float = 1.0,
    patch_size: PatchSizeSpec = 3,
    labels=None,
    schedule: Schedule = "cosine-legacy",
    prior: Callable[[torch.Tensor], torch.Tensor] | None = None,
    coordinates_per_call: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """The log density in nats, `[B]` (machine dtype), of images x `[B, C, H, W]` at time `t_min` under the
    machine's probability flow started at `t_max` from `prior` (a function of `[B, C, H, W]` returning `[B]` log
    densities; default the standard normal): `steps` Heun steps on a uniform grid in t (module docstring), each two
    velocity and two `divergence` evaluations. For images in [-1, 1] take a small `t_min`: the density at t = 0 of
    a machine is a mixture of points, and the integrand grows like 1/t there (Euler's step rule of `euler_sample`
    applies)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < t_min < t_max <= 1.0:
        raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    labels = labels_per_sample(labels, x.shape[0])
    x = x.detach().to(machine.device, machine.dtype)
    options = {"labels": labels, "schedule": schedule, "coordinates_per_call": coordinates_per_call}

    def rates(z: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        size = patch_size_at(patch_size, t)
        v = _velocity(machine, z, t, size, labels, schedule)[0]
        return v, divergence(machine, z, t, patch_size=patch_size, **options)

    h = (t_max - t_min) / steps
    change = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)  # int div v dt so far
    for i in tqdm(range(steps), desc="likelihood", disable=not progress, leave=False):
        t = t_min + i * h
        v, div = rates(x, t)
        v_next, div_next = rates(x + h * v, t + h)
        x = x + 0.5 * h * (v + v_next)
        change += 0.5 * h * (div + div_next)
    if prior is None:
        prior_log_density = -0.5 * (x.flatten(1).square().sum(1) + x[0].numel() * math.log(2 * math.pi))
    else:
        prior_log_density = prior(x)
    return prior_log_density + change


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
