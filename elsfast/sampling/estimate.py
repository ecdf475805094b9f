"""What a sampling run will cost, told before it starts: pairs to score and a time from a short calibration.

The work of a machine evaluation is its number of query x dictionary-entry pairs (`MachineStats.pairs`): per
group set `(G, S)` of `elsfast.reduce.patches.group_sets`, G * (S * B) queries against S * N entries for B images and N
training images (per class when class-conditional); IS scores B * N pairs, ES B * N * H * W. `estimate_sample`
adds them over the evaluations of a run and times one evaluation per distinct patch size on a slice of the
training set, so its seconds are an estimate for this machine as loaded now (one query image, so batched runs
usually go faster; backends chosen for large dictionaries, such as `dedup`, may differ from the calibration's).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..common.schedules import get_schedule
from ..machine import ScoreMachine
from ..reduce.patches import group_sets

__all__ = ["CALIBRATION_PAIRS", "LONG_RUN_PAIRS", "SampleEstimate", "estimate_sample", "evaluation_pairs"]

LONG_RUN_PAIRS = 2 * 10**10
"""Runs of more pairs than this (about 10 s at 2e9 pairs/s) print an estimate before they start."""

CALIBRATION_PAIRS = 10**8
"""Pairs of one calibration evaluation (about 0.05-0.5 s on a 2-core CPU, P = 3 to 15)."""


@dataclass
class SampleEstimate:
    """`pairs`: query x dictionary-entry pairs of the whole run; `seconds`: estimated wall time (NaN when not
    calibrated); `calibration_seconds`: what the calibration took; `rates`: measured pairs/s per patch size."""

    evaluations: int
    pairs: int
    seconds: float = math.nan
    calibration_seconds: float = 0.0
    rates: dict[int, float] = field(default_factory=dict)

    def describe(self, n: int) -> str:
        """One line for the user, e.g. `19 evaluations of 16 images: 1.2e+11 pairs, about 55 s on this machine`."""
        text = f"{self.evaluations} evaluations of {n} image(s): {self.pairs:.2g} query x dictionary pairs"
        if math.isfinite(self.seconds):
            text += (
                f", about {_duration(self.seconds)} on this machine as loaded now "
                f"(calibrated in {self.calibration_seconds:.1f} s)"
            )
        return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def evaluation_pairs(machine: ScoreMachine, batch: int, patch_size: int, labels: torch.Tensor | None = None) -> int:
    """Query x dictionary-entry pairs of one `machine.denoise` of `batch` images at `patch_size` (labels `[batch]`
    restrict each image to its class): the `MachineStats.pairs` that call reports (one process; with a process
    group each rank reports its shard's)."""
    _, H, W = machine.image_shape
    if labels is None:
        counts = [(batch, machine.images.shape[0])]
    else:
        wanted, per_label = torch.as_tensor(labels).unique(return_counts=True)
        counts = [(int(b), int((machine.labels == int(c)).sum())) for c, b in zip(wanted, per_label, strict=True)]
    if machine.machine in ("is", "es"):
        per = 1 if machine.machine == "is" else H * W
        return sum(b * n * per for b, n in counts)
    size = min(patch_size, 2 * max(H, W) - 1) if machine.padding == "zeros" else patch_size
    per_image_pair = sum(
        int(p.shape[0]) * int(p.shape[1]) ** 2 for p in group_sets(H, W, size, machine.padding, machine.machine)
    )
    return sum(b * n * per_image_pair for b, n in counts)


def estimate_sample(
    machine: ScoreMachine,
    n: int,
    steps: int,
    size_at: Callable[[float, int], int],
    *,
    schedule: str | Callable[[float], float] = "cosine-legacy",
    labels: torch.Tensor | None = None,
    calibrate: bool = True,
    start: int | None = None,
) -> SampleEstimate:
    """Pairs (and, with `calibrate`, seconds) of `elsfast.sample(machine, n, steps=steps, ...)` whose patch size
    at step i is `size_at(i / steps, i)`. The calibration times one evaluation at the smallest, the median and
    the largest distinct patch size (log pairs/s interpolated linearly in P for the others), each of one noise
    image against the first training images (as many as make `CALIBRATION_PAIRS` pairs) at the noise level of
    the first step with that size, after a warm-up on one training image. `start`: the step a resumed
    run starts at (default steps - 1, the beginning)."""
    start = steps - 1 if start is None else start
    sizes = {i: size_at(i / steps, i) for i in range(start, 0, -1)}
    pairs_of = {P: evaluation_pairs(machine, n, P, labels) for P in set(sizes.values())}
    estimate = SampleEstimate(len(sizes), sum(pairs_of[P] for P in sizes.values()))
    if not calibrate:
        return estimate
    abar_of = get_schedule(schedule)

    def probe(count: int) -> ScoreMachine:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the range of a slice says nothing new about the training set
            return ScoreMachine(
                machine.images[:count],
                machine=machine.machine,
                padding=machine.padding,
                backend=machine.backend,
                device=machine.device,
                memory_budget=machine.memory_budget,
                dtype=machine.dtype,
            )

    started = time.perf_counter()
    x = torch.randn(1, *machine.image_shape, generator=torch.Generator().manual_seed(0)).to(machine.dtype)
    distinct = sorted(set(sizes.values()))
    timed_sizes = sorted({distinct[0], distinct[len(distinct) // 2], distinct[-1]})
    for P in timed_sizes:
        step = next(i for i, size in sizes.items() if size == P)
        abar = min(max(abar_of(step / steps), 1e-6), 1 - 1e-6)
        per_image = evaluation_pairs(machine, 1, P) / machine.images.shape[0]
        count = max(1, min(machine.images.shape[0], round(CALIBRATION_PAIRS / max(per_image, 1.0))))
        probe(1).denoise(x, abar, P)  # warm-up: kernel set-up, first-touch allocations
        timed = probe(count)
        tick = time.perf_counter()
        timed.denoise(x, abar, P)
        estimate.rates[P] = timed.last_stats.pairs / max(time.perf_counter() - tick, 1e-6)
    for P in distinct:  # the others: log(rate) interpolated linearly in P between the timed sizes
        if P not in estimate.rates:
            lo = max(q for q in timed_sizes if q < P)
            hi = min(q for q in timed_sizes if q > P)
            w = (P - lo) / (hi - lo)
            estimate.rates[P] = math.exp((1 - w) * math.log(estimate.rates[lo]) + w * math.log(estimate.rates[hi]))
    estimate.seconds = sum(pairs_of[P] / estimate.rates[P] for P in sizes.values())
    estimate.calibration_seconds = time.perf_counter() - started
    return estimate
