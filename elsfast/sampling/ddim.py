"""The one deterministic DDIM sampler (eta = 0, no clipping) for machines and networks (SPEC section 1).

With n steps on the grid t_i = i / n the sampler starts from x ~ N(0, I) placed at t_{n-1} and, for
i = n-1, ..., 1, with x0 = D(x, abar_i) and eps = (x - sqrt(abar_i) x0) / sqrt(1 - abar_i), sets

    x <- sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1}) eps,

which is DDIM's update (Song et al. 2021, eq. 12 with sigma = 0). The last update lands on abar_0 = 1, so the
output is the denoiser's x0 prediction: n steps make n - 1 denoiser evaluations.

Any other grid of equal steps is given by its times (`ddim_sample(..., times=)`): `grid_times` makes the grid of a
sampler that starts where another with a different step count starts (the paper's Table 1 runs the network for
150 steps and the machines for 20 from the same noise, so the network's 150 steps divide the machines' first t).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..common.schedules import get_schedule

__all__ = ["GRIDS", "Denoiser", "StepCallback", "ddim_sample", "grid_start", "grid_times"]

GRIDS = {
    "machine": "noise placed at t = (n-1)/n, n-1 updates (elsfast's sampler; the authors' machine sampler)",
    "network": "noise placed at t = 1, n updates (the authors' network sampler and calibration loop)",
}
"""The two step grids of SPEC section 4, by name: where the noise is placed on t_i = i / n."""

Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]
"""denoiser(x, abar, step) -> x0 prediction, x `[B, C, H, W]`."""

StepCallback = Callable[[dict], None]
"""callback(info) after every update; info holds `i`, `t`, `abar`, `x` and `denoised` (see `ddim_sample`)."""


def grid_start(grid: str, steps: int, schedule: str | Callable[[float], float] = "cosine-legacy") -> int:
    """The `start` of `ddim_sample` for the named step grid (`GRIDS`): steps - 1 for "machine", steps for
    "network" (which needs abar(1) > 0, as the legacy cosine schedule has: abar(1) = 1.5e-4)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown step grid {grid!r}; known: {', '.join(GRIDS)}")
    if grid == "machine":
        return steps - 1
    if not get_schedule(schedule)(1.0) > 1e-8:
        raise ValueError("the 'network' step grid starts at t = 1, where this schedule has abar = 0: no signal to keep")
    return steps


def grid_times(
    grid: str,
    steps: int,
    *,
    shared_start: int | None = None,
    schedule: str | Callable[[float], float] = "cosine-legacy",
) -> list[float]:
    """The times t_0 = 0 < t_1 < ... < t_K (`ddim_sample`'s `times`) of a sampler of `steps` steps on step grid
    `grid` (`GRIDS`) that starts where a sampler of `shared_start` steps (default `steps`) on that grid starts.

    K = grid_start(grid, steps) equal updates (steps - 1 on the "machine" grid, steps on the "network" grid) from
    T = grid_start(grid, shared_start) / shared_start down to 0: t_i = T i / K, each the float nearest the exact
    fraction. So with `shared_start` = `steps` the times are i / steps, bit for bit; on the "network" grid T = 1
    whatever `shared_start`; on the "machine" grid 150 steps sharing the start of 20 make 149 updates from
    t = 19/20 (not from 149/150).
    """
    shared_start = steps if shared_start is None else int(shared_start)
    if steps < 2 or shared_start < 2:
        raise ValueError(f"steps and shared_start must be at least 2, got {steps} and {shared_start}")
    updates = grid_start(grid, steps, schedule)
    first = grid_start(grid, shared_start, schedule)  # T = first / shared_start
    return [(i * first) / (shared_start * updates) for i in range(updates + 1)]  # int / int: correctly rounded


def _check_times(times) -> list[float]:
    times = [float(t) for t in times]
    ok = len(times) >= 2 and times[0] == 0.0 and times[-1] <= 1.0
    if not ok or any(not b > a for a, b in itertools.pairwise(times)):
        shown = times if len(times) <= 6 else [*times[:3], "...", *times[-2:]]
        raise ValueError(f"times must increase strictly from 0 to at most 1 (at least two of them), got {shown}")
    return times


def ddim_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    steps: int | None = None,
    schedule: str | Callable[[float], float] = "cosine-legacy",
    progress: bool = True,
    callback: StepCallback | None = None,
    start: int | None = None,
    times: Sequence[float] | None = None,
) -> torch.Tensor:
    """Run the reverse process from noise `x` `[B, C, H, W]` placed at t = start / steps.

    `callback`, if given, receives after every update a dict with `i`, `t`, `abar`, `x` (the new state, at
    t = (i - 1) / steps, or t_(i-1) of `times`) and `denoised` (the x0 prediction at step i). `steps` defaults
    to 20. `start` is where `x` lies on the grid t_i = i / steps: default steps - 1 (the beginning of elsfast's
    grid); `steps` starts at t = 1 (the authors' network sampler, see `grid_start`); a smaller value resumes a
    run from its state at t = start / steps.

    `times` replaces that grid (then give neither `steps` nor `start`): t_0 = 0 < t_1 < ... < t_K, `x` placed at
    t_K, K updates from t_i to t_(i-1), the denoiser called at step i with abar(t_i) (see `grid_times`).
    """
    if times is not None:
        if steps is not None or start is not None:
            raise ValueError("give either times or steps (and start), not both")
        times = _check_times(times)
        start = len(times) - 1
        total, initial = start, 0
    else:
        steps = 20 if steps is None else steps
        if steps < 2:
            raise ValueError(f"steps must be at least 2, got {steps}")
        start = steps - 1 if start is None else start
        if not 1 <= start <= steps:
            raise ValueError(f"start must lie in [1, {steps}], got {start}")
        times = [i / steps for i in range(start + 1)]
        total, initial = max(start, steps - 1), max(0, steps - 1 - start)
    abar_of = get_schedule(schedule)
    for i in tqdm(
        range(start, 0, -1), desc="sampling", disable=not progress, leave=False, total=total, initial=initial
    ):
        t = times[i]
        abar, abar_prev = abar_of(t), abar_of(times[i - 1])
        x0 = denoiser(x, abar, i)
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1.0 - abar_prev)) * eps
        if callback is not None:
            callback({"i": i, "t": t, "abar": abar, "x": x, "denoised": x0})
    return x
