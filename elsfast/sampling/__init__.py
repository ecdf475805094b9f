"""The one deterministic DDIM sampler (eta = 0, no clipping) for machines and networks (SPEC section 1).

With n steps on the grid t_i = i / n the sampler starts from x ~ N(0, I) placed at t_{n-1} and, for
i = n-1, ..., 1, with x0 = D(x, abar_i) and eps = (x - sqrt(abar_i) x0) / sqrt(1 - abar_i), sets

    x <- sqrt(abar_{i-1}) x0 + sqrt(1 - abar_{i-1}) eps,

which is DDIM's update (Song et al. 2021, eq. 12 with sigma = 0). The last update lands on abar_0 = 1, so the
output is the denoiser's x0 prediction: n steps make n - 1 denoiser evaluations.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..common.checks import integer_labels
from ..common.fileio import atomic_write, describe_file, elsfast_format
from ..common.provenance import Provenance
from ..common.scales import PatchSizeSpec, resolve_patch_size
from ..common.schedules import get_schedule
from ..common.threads import check_threads, limit_threads
from ..machine import ScoreMachine
from ..reduce import DEFAULT_MEMORY_BUDGET
from .estimate import LONG_RUN_PAIRS, estimate_sample

__all__ = ["Denoiser", "SampleTrace", "ddim_sample", "labels_per_sample", "sample"]

Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]
"""denoiser(x, abar, step) -> x0 prediction, x `[B, C, H, W]`."""

StepCallback = Callable[[dict], None]


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
    """Run the reverse process from noise `x` `[B, C, H, W]` placed at t = (steps - 1) / steps.

    `callback`, if given, receives after every update a dict with `i`, `t`, `abar`, `x` (the new state, at
    t = (i - 1) / steps) and `denoised` (the x0 prediction at step i). `start` resumes a run: `x` is then the
    state at t = start / steps (default steps - 1, the beginning).
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    start = steps - 1 if start is None else start
    if not 1 <= start <= steps - 1:
        raise ValueError(f"start must lie in [1, {steps - 1}], got {start}")
    abar_of = get_schedule(schedule)
    for i in tqdm(
        range(start, 0, -1),
        desc="sampling",
        disable=not progress,
        leave=False,
        total=steps - 1,
        initial=steps - 1 - start,
    ):
        t = i / steps
        abar, abar_prev = abar_of(t), abar_of((i - 1) / steps)
        x0 = denoiser(x, abar, i)
        eps = (x - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
        x = math.sqrt(abar_prev) * x0 + math.sqrt(max(0.0, 1.0 - abar_prev)) * eps
        if callback is not None:
            callback({"i": i, "t": t, "abar": abar, "x": x, "denoised": x0})
    return x


def _run_key(m: ScoreMachine, noise: torch.Tensor, steps: int, schedule, sizes: list[int], labels) -> str:
    """Fingerprint of everything that determines a sampling run, so a checkpoint resumes only its own run."""
    digest = hashlib.sha256(m.fingerprint.encode())
    for part in (
        m.machine,
        m.padding,
        m.dictionary,
        m.dtype,
        steps,
        schedule if isinstance(schedule, str) else repr(schedule),
        sizes,
    ):
        digest.update(repr(part).encode())
    for tensor in (noise, labels):
        if tensor is not None:
            digest.update(repr(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


STATE_FORMAT = "elsfast-sampling-state"
STATE_VERSION = 1


def _read_state(path: Path) -> dict:
    """The sampling checkpoint at `path` (written by `sample(resume_from=...)`); ValueError naming the file and
    saying what it looks like when it is anything else (it is then left as it is)."""
    if path.is_dir():
        raise ValueError(f"resume_from: {path} is a directory, not a sampling checkpoint")
    fmt = elsfast_format(path)
    if fmt != STATE_FORMAT:
        raise ValueError(
            f"resume_from: {path} is not an elsfast sampling checkpoint: it looks like {describe_file(path)}. "
            "elsfast leaves it as it is; pass another path (or none) to resume_from / --resume-from"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file of ours: report it, never delete it
        raise ValueError(f"resume_from: the sampling checkpoint {path} is damaged ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"resume_from: {path} has sampling-checkpoint version {version!r}, not {STATE_VERSION}")
    return state


def _resume(path: Path, key: str, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """The saved state and its step if `path` holds a checkpoint of this run, else (x, None) when there is no
    file. Any other file (another run's checkpoint, a network checkpoint, anything) raises ValueError."""
    if not path.exists():
        return x, None
    state = _read_state(path)
    if state.get("key") != key or not isinstance(state.get("x"), torch.Tensor) or state["x"].shape != x.shape:
        raise ValueError(
            f"resume_from: {path} holds the state of another sampling run (a different machine, training set, "
            "noise, steps, patch sizes or labels); elsfast leaves it as it is: delete it to start over, or pass "
            "another path"
        )
    return state["x"].to(x), int(state["i"])


def labels_per_sample(labels, n: int) -> torch.Tensor | None:
    """`labels` (one class for every sample, or one per sample) as int64 `[n]`, or None. Non-integer labels
    raise ValueError (1.7 is not class 1), a count other than 1 or `n` raises ValueError."""
    if labels is None:
        return None
    labels = integer_labels(labels, "labels")
    if labels.dim() == 0:
        return labels.expand(n).clone()
    labels = labels.flatten()
    if labels.numel() != n:
        raise ValueError(f"labels must be one int or {n} ints (one per sample), got {labels.numel()}")
    return labels


def _announce(m: ScoreMachine, n: int, steps: int, size_at, schedule, labels, start: int | None) -> None:
    """Print the pairs and an estimated time of a long run (over `LONG_RUN_PAIRS`) to stderr before it starts."""
    plan = estimate_sample(m, n, steps, size_at, schedule=schedule, labels=labels, calibrate=False, start=start)
    if plan.pairs > LONG_RUN_PAIRS:
        plan = estimate_sample(m, n, steps, size_at, schedule=schedule, labels=labels, start=start)
        print(f"elsfast: sampling {plan.describe(n)}", file=sys.stderr, flush=True)


def sample(
    source: ScoreMachine | torch.Tensor | str | Path,
    n: int = 16,
    *,
    steps: int = 20,
    patch_size: PatchSizeSpec = 3,
    machine: str = "els",
    padding: str = "zeros",
    labels: int | Sequence[int] | torch.Tensor | None = None,
    seed: int = 0,
    schedule: str | Callable[[float], float] = "cosine-legacy",
    backend: str = "auto",
    progress: bool = True,
    device: torch.device | str | None = None,
    train_labels: torch.Tensor | Sequence[int] | None = None,
    data_root: str | Path | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    noise: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    return_provenance: bool = False,
    resume_from: str | Path | None = None,
    checkpoint: str | Path | None = None,
    generator: torch.Generator | None = None,
    threads: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SampleTrace]:
    """Generate `n` images `[n, C, H, W]` in [-1, 1]-ish units with an analytic machine.

    Args:
        source: a `ScoreMachine` (its machine, padding, dictionary, backend and device are used as they are; e.g.
            `ScoreMachine(images, dictionary="valid")` for the authors' ELS dictionary), a tensor of
            training images `[N, C, H, W]` (with `train_labels` for conditional sampling), or a dataset name
            or path understood by `elsfast.datasets.load` (train split; its labels come along).
        patch_size: an odd int, a list with one size per step, a callable of t, or the name of a published
            calibrated list (see `elsfast.common.scales.reference_scales()`).
        labels: class label(s) for class-conditional sampling: one int or one per sample.
        seed: seeds the initial noise, drawn on the CPU so that a seed gives the same noise on every device.
        noise: initial noise `[n, C, H, W]` to use instead of drawing it from `seed`.
        generator: a CPU `torch.Generator` to draw the initial noise from instead of `seed`.
        progress: a progress bar; and for a run of more than `estimate.LONG_RUN_PAIRS` query x dictionary
            pairs, one line on stderr before it starts with the pairs and the time estimated by a short
            calibration (`elsfast.sampling.estimate.estimate_sample`).
        callback: called after every step (see `ddim_sample`).
        return_provenance: also return a `SampleTrace`: the provenance of every pixel at the last machine
            evaluation (which produces the output) and the posterior entropy maps of every step.
        resume_from: a sampling checkpoint file: the state is written to it atomically after every step (a
            torch file with `format` "elsfast-sampling-state", a version and the run's key); if it exists when
            a run starts and was written by the same run (same machine, training set, noise, steps, sizes,
            labels), sampling resumes from it instead of starting over. Any other existing file (another run's
            checkpoint, a network checkpoint, ...) raises ValueError naming it and is left untouched. The file is
            removed when the run finishes. A trace (`return_provenance`) then covers the steps run since the
            resume.
        threads: CPU threads of the compiled kernels and of torch during the run (default: `ELSFAST_NUM_THREADS`,
            else torch's count; never more than the CPUs this process may use; see `elsfast.common.threads`).
        checkpoint: deprecated name of `resume_from` (DeprecationWarning; removed in the next release).
    """
    if checkpoint is not None:
        if resume_from is not None:
            raise TypeError("pass resume_from= only (checkpoint= is its deprecated name)")
        warnings.warn(
            "sample(checkpoint=...) is deprecated: use resume_from= (the same file); checkpoint= goes in the next "
            "release",
            DeprecationWarning,
            stacklevel=2,
        )
        resume_from = checkpoint
    check_threads(threads)
    if isinstance(source, ScoreMachine):
        m = source
    else:
        if isinstance(source, str | Path):
            from .. import datasets

            data = datasets.load(str(source), split="train", root=data_root)
            images, train_labels = data.images, data.labels
        else:
            images = source
        m = ScoreMachine(
            images,
            train_labels,
            machine=machine,
            padding=padding,
            backend=backend,
            device=device,
            memory_budget=memory_budget,
        )
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {steps!r}")
    size_at = resolve_patch_size(patch_size, steps)
    sample_labels = labels_per_sample(labels, n)
    if noise is None:
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        # drawn in float32 whatever the machine's dtype, so a seed means the same noise for every machine
        noise = torch.randn(n, *m.image_shape, generator=generator).to(m.dtype)
    elif tuple(noise.shape) != (n, *m.image_shape):
        raise ValueError(f"noise must have shape {[n, *m.image_shape]}, got {list(noise.shape)}")

    trace: list[tuple[float, int, Provenance]] = []

    def denoiser(x: torch.Tensor, abar: float, i: int) -> torch.Tensor:
        size = size_at(i / steps, i)
        if not return_provenance:
            return m.denoise(x, abar, size, sample_labels)
        x0, prov = m.denoise(x, abar, size, sample_labels, return_provenance=True)
        trace.append((i / steps, size, prov))
        return x0

    x, start, on_step = noise.to(m.device, m.dtype), None, callback
    state_path = None if resume_from is None else Path(resume_from)
    if state_path is not None:
        key = _run_key(m, noise, steps, schedule, [size_at(i / steps, i) for i in range(steps)], sample_labels)
        x, start = _resume(state_path, key, x)

        def on_step(info: dict) -> None:
            if info["i"] > 1:  # the last update is the output itself
                state = {
                    "format": STATE_FORMAT,
                    "version": STATE_VERSION,
                    "key": key,
                    "i": info["i"] - 1,
                    "x": info["x"].cpu(),
                }
                atomic_write(state_path, lambda f: torch.save(state, f))
            if callback is not None:
                callback(info)

    with limit_threads(threads):
        if progress and m.process_group is None:
            _announce(m, n, steps, size_at, schedule, sample_labels, start)
        out = ddim_sample(denoiser, x, steps=steps, schedule=schedule, progress=progress, callback=on_step, start=start)
    if state_path is not None and elsfast_format(state_path) == STATE_FORMAT:
        state_path.unlink()  # only our own checkpoint: anything else that appeared there stays
    if not return_provenance:
        return out
    times, sizes, provs = zip(*trace, strict=True)
    return out, SampleTrace(provs[-1], torch.stack([p.entropy for p in provs]), list(times), list(sizes))
