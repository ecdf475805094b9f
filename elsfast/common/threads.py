"""How many threads the compiled CPU kernels use, decided in one place, and how idle threads wait.

`kernel_threads()` is what the `cpu`, `shifts` and `dedup` backends pass to `elsfast._cpu`; in order:

1. the count set by `set_num_threads(n)` or, for a block of code, `limit_threads(n)` (also `sample(threads=)`
   and `elsfast sample --threads`);
2. the environment variable `ELSFAST_NUM_THREADS`;
3. torch's intra-op thread count (`torch.get_num_threads()`),

never more than the CPUs this process may use (its CPU affinity and a cgroup CPU quota, e.g. a container's
`--cpus`): the kernels share torch's OpenMP thread pool, so they never add threads beside torch's own.

Waiting. An OpenMP worker that finishes its share of a parallel region spins before it sleeps; libgomp spins
300,000 rounds by default (milliseconds), which on a CPU shared with other busy processes burns the cores that
the busy work needs (measured in docs/performance.md, "a shared CPU"). libgomp reads its wait
policy once, when it is loaded (at `import torch`), so `bound_openmp_spin()`, called by `import elsfast` before
it imports torch, sets `GOMP_SPINCOUNT` to `SPIN_COUNT` (a bounded spin of a few microseconds, enough
for back-to-back parallel regions on a quiet machine) unless `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` is already
set, `ELSFAST_OMP_SPIN=default` asks to leave libgomp alone, or torch was imported first (then it has no effect:
start Python with `OMP_WAIT_POLICY=passive`, or import elsfast before torch). The `elsfast` command always
imports elsfast first.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "SPIN_COUNT",
    "available_cpus",
    "bound_openmp_spin",
    "check_threads",
    "kernel_threads",
    "limit_threads",
    "set_num_threads",
]

SPIN_COUNT = 1_000
"""`GOMP_SPINCOUNT` set by `bound_openmp_spin`: a few microseconds of spinning, against libgomp's 300,000."""

_chosen: int | None = None


def _cgroup_cpus() -> float | None:
    """The cgroup v2 CPU quota of this process in CPUs (`cpu.max` quota / period), or None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1.0, int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (all CPUs where there is none), capped by a cgroup quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)


def check_threads(threads: int | None) -> int | None:
    """`threads` if it is None or a positive int; ValueError/TypeError naming `threads` otherwise."""
    return None if threads is None else _positive(threads, "threads")


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _from_environment() -> int | None:
    text = os.environ.get("ELSFAST_NUM_THREADS", "").strip()
    if not text:
        return None
    try:
        return _positive(int(text), "ELSFAST_NUM_THREADS")
    except (TypeError, ValueError):
        raise ValueError(f"ELSFAST_NUM_THREADS must be a positive integer, got {text!r}") from None


def kernel_threads() -> int:
    """Threads for one call of a compiled CPU kernel (see the module docstring for the order of precedence)."""
    import torch

    wanted = _chosen if _chosen is not None else _from_environment()
    if wanted is None:
        wanted = torch.get_num_threads()
    return max(1, min(wanted, available_cpus()))


def set_num_threads(threads: int | None) -> None:
    """Set the compiled kernels' thread count for this process (None: back to `ELSFAST_NUM_THREADS` or torch's).
    torch's own intra-op count is not changed; `limit_threads` changes both for a block of code."""
    global _chosen
    _chosen = None if threads is None else _positive(threads, "threads")


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Within the block, the kernels and torch's intra-op work use `threads` threads, capped at the CPUs this
    process may use (`available_cpus`; None: no change); both are restored afterwards."""
    if threads is None:
        yield
        return
    import torch

    global _chosen
    threads = min(_positive(threads, "threads"), available_cpus())
    before_kernel, before_torch = _chosen, torch.get_num_threads()
    _chosen = threads
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        _chosen = before_kernel
        torch.set_num_threads(before_torch)


def bound_openmp_spin() -> bool:
    """Set `GOMP_SPINCOUNT=SPIN_COUNT` for libgomp if it can still take effect and nobody chose a wait policy;
    returns whether it did (see the module docstring)."""
    if "torch" in sys.modules or os.environ.get("ELSFAST_OMP_SPIN", "").strip().lower() == "default":
        return False
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
