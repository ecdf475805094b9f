"""`sample`: images from an analytic machine in one call (the DDIM sampler over a `ScoreMachine`).

It builds the machine when given images or a dataset (its options go to `ScoreMachine`), draws the initial noise
from a seed, reads the patch-size spec, and runs `ddim_sample`; optionally it resumes from a
`SamplingCheckpoint` and records a `SampleTrace` (provenance and entropy).
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..common.checks import check_finite_input, check_seed, labels_per_sample
from ..common.memory import check_batch_memory
from ..common.provenance import Provenance
from ..common.scales import PatchSizeSpec, resolve_patch_size
from ..common.threads import check_threads, limit_threads
from ..machine import ScoreMachine
from .checkpoint import SamplingCheckpoint
from .ddim import StepCallback, ddim_sample
from .estimate import LONG_RUN_PAIRS, estimate_sample

__all__ = ["MACHINE_OPTIONS", "SampleTrace", "sample"]

MACHINE_OPTIONS = ("machine", "padding", "dictionary", "backend", "device", "memory_budget", "dtype", "train_labels")
"""`ScoreMachine`'s keywords that `sample` passes on when it builds the machine from images or a dataset."""

DATASET_OPTIONS = ("root", "pad_to", "limit", "conditional")
"""`ScoreMachine.from_dataset`'s keywords that `sample` passes on when `source` names a dataset."""

_RENAMED = {"checkpoint": "resume_from", "data_root": "root"}
"""Old keywords of `sample` that still work for one release, with a DeprecationWarning: old -> new."""
_HOW = {"checkpoint": "the same file", "data_root": "the same folder"}


@dataclass(frozen=True)
class SampleTrace:
    """What `sample(..., return_provenance=True)` records besides the images.

    - `provenance`: per-pixel `Provenance` at the last machine evaluation, whose x0 prediction is the output;
    - `entropy`: `[K, n, H, W]` posterior entropy (nats) of every pixel at each of the K = steps - 1
      evaluations, in sampling order (t from high to low);
    - `times`, `patch_sizes`: t and P of each evaluation.
    """

    provenance: Provenance
    entropy: torch.Tensor
    times: list[float]
    patch_sizes: list[int]


def _announce(m: ScoreMachine, n: int, steps: int, size_at, schedule, labels, start: int | None) -> None:
    """Print the pairs and an estimated time of a long run (over `LONG_RUN_PAIRS`) to stderr before it starts."""
    plan = estimate_sample(m, n, steps, size_at, schedule=schedule, labels=labels, calibrate=False, start=start)
    if plan.pairs > LONG_RUN_PAIRS:
        plan = estimate_sample(m, n, steps, size_at, schedule=schedule, labels=labels, start=start)
        print(f"elsfast: sampling {plan.describe(n)}", file=sys.stderr, flush=True)


def _renamed(options: dict[str, Any], resume_from):
    """Take the deprecated keywords out of `options`, warn, and return `resume_from` with them applied."""
    for old, new in _RENAMED.items():
        if old not in options:
            continue
        value = options.pop(old)
        warnings.warn(
            f"sample({old}=...) is deprecated: use {new}= ({_HOW[old]}); {old}= goes in the next release",
            DeprecationWarning,
            stacklevel=3,
        )
        if old == "checkpoint":
            if resume_from is not None:
                raise TypeError("pass resume_from= only (checkpoint= is its deprecated name)")
            resume_from = value
        else:
            if "root" in options:
                raise TypeError("pass root= only (data_root= is its deprecated name)")
            options["root"] = value
    return resume_from


def _machine(source, options: dict[str, Any]) -> ScoreMachine:
    """The machine of `source` (a `ScoreMachine`, images `[N, C, H, W]` or a dataset name or path)."""
    if isinstance(source, ScoreMachine):
        unknown = sorted(set(options) - set(MACHINE_OPTIONS + DATASET_OPTIONS))
        if unknown:
            raise TypeError(f"sample() got unexpected keyword(s) {', '.join(unknown)}")
        if options:
            raise TypeError(
                f"sample: {', '.join(sorted(options))} configure the machine: pass them to ScoreMachine(...), not "
                "with a ScoreMachine as source"
            )
        return source
    allowed = MACHINE_OPTIONS + (DATASET_OPTIONS if isinstance(source, str | Path) else ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"sample() got unexpected keyword(s) {', '.join(unknown)}; machine options: {', '.join(allowed)}"
        )
    if isinstance(source, str | Path):
        options = dict(options)
        if options.pop("train_labels", None) is not None:
            raise TypeError("sample: train_labels is for a tensor source; a dataset brings its labels")
        return ScoreMachine.from_dataset(str(source), split="train", **options)
    return ScoreMachine(source, **options)


def _check_batch(m: ScoreMachine, n: int, steps: int, return_provenance: bool) -> None:
    """Refuse up front a batch whose tensors cannot fit in memory (`check_batch_memory`): the float32 noise and
    label, on the CPU; the current image, the prediction, the noise estimate, the next image and the output in
    the machine's dtype, with the trace's per-step entropy and provenance fields, on the machine's device."""
    pixels = math.prod(m.image_shape)
    itemsize = torch.empty(0, dtype=m.dtype).element_size()
    check_batch_memory("n (samples, --n)", n, 4 * pixels + 8, "cpu")
    trace = (steps + 5) * itemsize * pixels // m.image_shape[0] if return_provenance else 0
    check_batch_memory("n (samples, --n)", n, 5 * itemsize * pixels + trace, m.device)


def sample(
    source: ScoreMachine | torch.Tensor | str | Path,
    n: int = 16,
    *,
    steps: int = 20,
    patch_size: PatchSizeSpec = 3,
    labels: int | Sequence[int] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    schedule: str | Callable[[float], float] = "cosine-legacy",
    progress: bool = True,
    callback: StepCallback | None = None,
    resume_from: str | Path | None = None,
    return_provenance: bool = False,
    threads: int | None = None,
    write_outputs: Callable[[torch.Tensor], object] | None = None,
    **machine_options: Any,
) -> torch.Tensor | tuple[torch.Tensor, SampleTrace]:
    """Generate `n` images `[n, C, H, W]` in [-1, 1]-ish units with an analytic machine.

    Args:
        source: a `ScoreMachine` (used as it is: its machine, padding, dictionary, backend, device), a tensor of
            training images `[N, C, H, W]`, or a dataset name or path understood by `elsfast.datasets.load`
            (train split; its labels come along).
        n: how many images.
        steps: DDIM steps (steps - 1 machine evaluations).
        patch_size: an odd int, a list with one size per step, a callable of t, or the name of a published
            calibrated list (see `elsfast.reference_scales()`).
        labels: class label(s) for class-conditional sampling: one int or one per sample.
        generator: the CPU `torch.Generator` to draw the initial noise from, as torch functions take it; None
            (default, with no `seed`): torch's global generator, so `torch.manual_seed` decides the noise. The
            noise is drawn on the CPU in float32, so a generator state gives the same noise on every device and
            dtype.
        seed: a convenience: an int draws from `torch.Generator().manual_seed(seed)` (a `torch.Generator` is
            taken as `generator=`). Give `generator` or `seed`, not both.
        noise: initial noise `[n, C, H, W]` (a float tensor or numpy array) to use instead of drawing it.
        schedule: the noise schedule abar(t): a name of `elsfast.common.schedules.SCHEDULES` or a callable.
        progress: a progress bar; and for a run of more than `LONG_RUN_PAIRS` query x dictionary pairs, one line on
            stderr before it starts with the pairs and the time estimated by a short calibration
            (`elsfast.sampling.estimate_sample`).
        callback: called after every step (see `ddim_sample`).
        resume_from: a sampling checkpoint file (`SamplingCheckpoint`): the state is written to it atomically after
            every step; if it exists when a run starts and was written by the same run, sampling resumes from it.
            Any other existing file raises ValueError naming it and is left untouched. The file is removed when
            the run finishes (after `write_outputs`). A trace (`return_provenance`) then covers the steps run
            since the resume.
        return_provenance: also return a `SampleTrace`: the provenance of every pixel at the last machine
            evaluation (which produces the output) and the posterior entropy maps of every step.
        threads: CPU threads of the compiled kernels and of torch during the run (default: `ELSFAST_NUM_THREADS`,
            else torch's count; never more than the CPUs this process may use; see `elsfast.limit_threads`).
        write_outputs: called with the finished samples `[n, C, H, W]` before the sampling checkpoint
            `resume_from` is removed: write the run's files there, so that a run killed before they are all
            written keeps its checkpoint, and the same call run again resumes from it instead of step 0.
        **machine_options: when `source` is images or a dataset, the `ScoreMachine` options `MACHINE_OPTIONS`
            (`machine="els"`, `padding="zeros"`, `dictionary`, `backend="auto"`, `device`, `memory_budget`,
            `dtype`, `train_labels` for images), and for a dataset `root`, `pad_to`, `limit`, `conditional`.

    Deprecated keywords (DeprecationWarning; removed in the next release): `checkpoint=` (use `resume_from=`),
    `data_root=` (use `root=`).
    """
    resume_from = _renamed(machine_options, resume_from)
    if generator is not None and seed is not None:
        raise TypeError("sample: give generator= or seed=, not both")
    if isinstance(seed, torch.Generator):
        generator, seed = seed, None
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    check_threads(threads)
    if seed is not None:
        seed = check_seed(seed, "seed")
    m = _machine(source, machine_options)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {steps!r}")
    size_at = resolve_patch_size(patch_size, steps)
    _check_batch(m, n, steps, return_provenance)
    sample_labels = labels_per_sample(labels, n)
    if noise is None:
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        # drawn in float32 whatever the machine's dtype, so a seed means the same noise for every machine; with no
        # generator, from torch's global one (torch.manual_seed)
        noise = torch.randn(n, *m.image_shape, generator=generator).to(m.dtype)
    else:
        if isinstance(noise, np.ndarray):
            noise = torch.from_numpy(noise)
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            what = getattr(noise, "dtype", type(noise).__name__)
            raise TypeError(f"noise must be a float tensor (or numpy array) [n, C, H, W], got {what}")
        if tuple(noise.shape) != (n, *m.image_shape):
            raise ValueError(f"noise must have shape {[n, *m.image_shape]}, got {list(noise.shape)}")
        check_finite_input(noise, "noise")

    trace: list[tuple[float, int, Provenance]] = []

    def denoiser(x: torch.Tensor, abar: float, i: int) -> torch.Tensor:
        size = size_at(i / steps, i)
        if not return_provenance:
            return m.denoise(x, abar, size, sample_labels)
        x0, prov = m.denoise(x, abar, size, sample_labels, return_provenance=True)
        trace.append((i / steps, size, prov))
        return x0

    x, start, on_step = noise.to(m.device, m.dtype), None, callback
    checkpoint = None
    if resume_from is not None:
        sizes = [size_at(i / steps, i) for i in range(steps)]
        checkpoint = SamplingCheckpoint.for_run(resume_from, m, noise, steps, schedule, sizes, sample_labels)
        x, start = checkpoint.resume(x)

        def on_step(info: dict) -> None:
            if info["i"] > 1:  # the last update is the output itself
                checkpoint.save(info["i"] - 1, info["x"])
            if callback is not None:
                callback(info)

    with limit_threads(threads):
        if progress and m.process_group is None:
            _announce(m, n, steps, size_at, schedule, sample_labels, start)
        out = ddim_sample(denoiser, x, steps=steps, schedule=schedule, progress=progress, callback=on_step, start=start)
    if write_outputs is not None:
        write_outputs(out)
    if checkpoint is not None:
        checkpoint.remove()
    if not return_provenance:
        return out
    times, sizes, provs = zip(*trace, strict=True)
    return out, SampleTrace(provs[-1], torch.stack([p.entropy for p in provs]), list(times), list(sizes))
