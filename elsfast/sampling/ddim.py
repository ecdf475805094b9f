"""The one deterministic DDIM sampler (eta = 0, no clipping) for machines and networks (SPEC section 1).

With n steps on the grid t_i = i / n the sampler starts from x ~ N(0, I) placed at t_{n-1} and, for
i = n-1, ..., 1, with x0 = D(x, abar_i) and eps = (x - sqrt(abar_i) x0) / sqrt(1 - abar_i), sets

    x <- sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1}) eps,

which is DDIM's update (Song et al. 2021, eq. 12 with sigma = 0). The last update lands on abar_0 = 1, so the
output is the denoiser's x0 prediction: n steps make n - 1 denoiser evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..common.schedules import get_schedule

__all__ = ["GRIDS", "Denoiser", "StepCallback", "ddim_sample", "grid_start"]

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


def ddim_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    *,
    steps: int = 20,
    schedule: str | Callable[[float], float] = "cosine-legacy",
    progress: bool = True,
    callback: StepCallback | None = None,
    start: int | None = None,
) -> torch.Tensor:
    """Run the reverse process from noise `x` `[B, C, H, W]` placed at t = start / steps.

    `callback`, if given, receives after every update a dict with `i`, `t`, `abar`, `x` (the new state, at
    t = (i - 1) / steps) and `denoised` (the x0 prediction at step i). `start` is where `x` lies on the grid
    t_i = i / steps: default steps - 1 (the beginning of elsfast's grid); `steps` starts at t = 1 (the authors'
    network sampler, see `grid_start`); a smaller value resumes a run from its state at t = start / steps.
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    start = steps - 1 if start is None else start
    if not 1 <= start <= steps:
        raise ValueError(f"start must lie in [1, {steps}], got {start}")
    abar_of = get_schedule(schedule)
    for i in tqdm(
        range(start, 0, -1),
        desc="sampling",
        disable=not progress,
        leave=False,
        total=max(start, steps - 1),
        initial=max(0, steps - 1 - start),
    ):
        t = i / steps
        abar, abar_prev = abar_of(t), abar_of((i - 1) / steps)
        x0 = denoiser(x, abar, i)
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1.0 - abar_prev)) * eps
        if callback is not None:
            callback({"i": i, "t": t, "abar": abar, "x": x, "denoised": x0})
    return x
