"""Choosing the Triton kernel's launch configuration by timing (`Triton(tune=True)`).

The default configuration of each key dimension was chosen from the compiled code (benchmarks/static_cost.py);
with `tune=True` the backend instead times every configuration of `elsfast.kernels.softmax_reduce.tuning_space` on
the problem it is given (its queries against the leading training images: `TUNING_PAIRS`), the first time it
meets a problem of its kind, and keeps the fastest. Every candidate
computes the same reduction (the conformance suite runs each one against the float64 reference), so tuning moves
only rounding: the choice, not the answer, depends on the timings.

A kind of problem (`tuning_key`): the device's name, the kernel's compile-time arguments that tuning does not
change (D, E, precision, provenance, uint8 images, value block), and the powers of two at or above the number of
queries (G x M) and of dictionary entries (N x S). Choices live in memory for the process and, where the disk
cache is on (`elsfast.common.cache.cache_dir`), in `triton-tuning.json` there, so that a later process on the same
machine times nothing; a choice whose configuration is no longer a candidate (another elsfast version) is timed
again. `clear_tuning()` forgets the choices held in memory.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable

import torch

from ..common.cache import cache_dir
from ..common.fileio import atomic_write

__all__ = ["TUNED_KEYS", "TUNING_FILE", "TUNING_PAIRS", "choose_config", "clear_tuning", "time_call", "tuning_key"]

log = logging.getLogger(__name__)

TUNING_FILE = "triton-tuning.json"
TUNED_KEYS = ("D", "E", "IS_UINT8", "PROVENANCE", "DOT_PRECISION", "BLOCK_E", "FAST_EXP2")
"""The compile-time arguments that are part of a problem's kind (the rest is what tuning chooses)."""

TUNING_PAIRS = 1 << 34
"""About how many query-entry pairs one timed run has: the candidates are timed on all the queries against the
leading training images only (some 10 ms at P = 3 to 150 ms at P = 17 on an H100-class GPU, as predicted by
benchmarks/static_cost.py), so tuning a full CIFAR-10 problem takes seconds, not the minutes of timing it whole."""

_CHOICES: dict[str, dict] = {}
_LOADED = False


def tuning_key(device: torch.device, config: dict, queries: int, entries: int) -> str:
    """The kind of problem a choice is kept for: `device`'s name, `config`'s `TUNED_KEYS`, and the powers of two
    at or above `queries` (G x M) and `entries` (N x S)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (interpreter)"

    def bucket(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()

    return json.dumps([name, *(config[k] for k in TUNED_KEYS), bucket(queries), bucket(entries)])


def time_call(run: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Seconds one `run()` takes on `device`: a first call (compiles the kernel, not timed), then the median of
    `repeats` timed calls (CUDA events on a GPU, the wall clock elsewhere)."""
    run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    folder = cache_dir()
    path = None if folder is None else folder / TUNING_FILE
    if path is None or not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        log.warning("ignoring %s (%s): configurations will be timed again", path, error)
        return
    if isinstance(saved, dict):
        for key, config in saved.items():
            _CHOICES.setdefault(key, config)


def _save() -> None:
    folder = cache_dir()
    if folder is None:
        return
    text = json.dumps(_CHOICES, indent=1, sort_keys=True).encode()
    try:
        atomic_write(folder / TUNING_FILE, lambda f: f.write(text), replace="any")
    except OSError as error:  # a read-only cache: the choice stays in memory
        log.warning("could not save the tuning choice in %s: %s", folder, error)


def choose_config(
    key: str,
    candidates: list[dict],
    run: Callable[[dict], object],
    *,
    timer: Callable[[Callable[[], object]], float],
) -> dict:
    """The candidate kept for `key`, else the fastest of `candidates` by `timer(lambda: run(config))`, kept for
    `key` from then on (in memory and in the disk cache). `candidates` are `launch_config` dicts."""
    _load()
    chosen = _CHOICES.get(key)
    if chosen is not None and chosen in candidates:
        return chosen
    times = [timer(lambda config=config: run(config)) for config in candidates]
    best = min(range(len(candidates)), key=times.__getitem__)
    log.info(
        "elsfast: Triton configuration for %s: %s of %s (seconds: %s)",
        key,
        best,
        len(candidates),
        ", ".join(f"{t:.3g}" for t in times),
    )
    _CHOICES[key] = candidates[best]
    _save()
    return candidates[best]


def clear_tuning() -> None:
    """Forget the choices held in memory (the disk cache is read again at the next choice)."""
    global _LOADED
    _CHOICES.clear()
    _LOADED = False
