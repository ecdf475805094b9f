"""Collectives of sharded machines that end instead of hanging, and the check that every rank made the same call.

A sharded machine (`ScoreMachine(..., process_group=...)`) is exact only when every rank reduces the same queries
at the same noise level and patch size with the same kind of machine: ranks given different noise would blend
their answers without an error. `check_same_call` all-gathers a small integer checksum of what each rank was given
(the bits of the queries, labels, abar, patch size, the machine's kind, padding, dictionary and dtype) and raises
on every rank, naming the ranks that differ from rank 0 and in what.

Every collective elsfast issues waits at most `collective_timeout()` seconds (default 600; set it with
`set_collective_timeout` or the environment variable `ELSFAST_COLLECTIVE_TIMEOUT`), then raises
`CollectiveTimeout` saying which operation did not complete: a rank that hangs, died or skipped a call ends the
job with a message instead of blocking the others forever.
"""

from __future__ import annotations

import datetime
import os
import struct
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["CollectiveTimeout", "check_same_call", "collective_timeout", "set_collective_timeout", "timed"]

DEFAULT_TIMEOUT = 600.0
_timeout: float | None = None  # set_collective_timeout's value; None: the environment's, else the default


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within `collective_timeout()` seconds."""


def _positive_seconds(value: float, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return seconds


def set_collective_timeout(seconds: float | None) -> None:
    """Set how long every elsfast collective waits before raising `CollectiveTimeout` (None: back to
    `ELSFAST_COLLECTIVE_TIMEOUT`, else 600 s)."""
    global _timeout
    _timeout = None if seconds is None else _positive_seconds(seconds, "seconds")


def collective_timeout() -> float:
    """Seconds every elsfast collective waits (see the module docstring)."""
    if _timeout is not None:
        return _timeout
    env = os.environ.get("ELSFAST_COLLECTIVE_TIMEOUT")
    return DEFAULT_TIMEOUT if env is None else _positive_seconds(env, "ELSFAST_COLLECTIVE_TIMEOUT")


def timed(operation: str, collective: Callable, *args, group: dist.ProcessGroup | None = None, **kwargs) -> None:
    """Run `collective(*args, group=group, async_op=True, **kwargs)` (a torch.distributed collective) and wait
    for it at most `collective_timeout()` seconds; raise `CollectiveTimeout` naming `operation` otherwise."""
    work = collective(*args, group=group, async_op=True, **kwargs)
    seconds = collective_timeout()
    try:
        work.wait(timeout=datetime.timedelta(seconds=seconds))
    except RuntimeError as err:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise CollectiveTimeout(
            f"elsfast: {operation} on rank {rank} of {world} did not complete within {seconds:g} s: another rank "
            f"hangs, died, or did not make the same call ({' '.join(str(err).split())}). Set the limit with "
            "elsfast.reduce.collectives.set_collective_timeout(seconds) or ELSFAST_COLLECTIVE_TIMEOUT"
        ) from err


def _bits_checksum(t: torch.Tensor) -> tuple[int, int]:
    """Two int64 checksums of the bits of `t` (its sum, and a position-weighted sum that catches reorderings):
    integer sums, so the same on every rank whatever the threads or summation order."""
    t = t.detach().contiguous().flatten()
    if t.is_floating_point():
        t = t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    t = t.to(torch.int64)
    weights = torch.arange(t.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
    return int(t.sum()), int((t * weights).sum())


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def check_same_call(
    group: dist.ProcessGroup | None,
    device: torch.device,
    x: torch.Tensor,
    abar: float,
    patch_size: int,
    labels: torch.Tensor | None,
    machine: str,
) -> None:
    """Raise ValueError on every rank unless every rank of `group` was given the same queries `x`, `abar`,
    `patch_size` and `labels`, for the same `machine` description (kind, padding, dictionary, dtype). One
    all-gather of 8 int64 per rank, on `device` (NCCL needs a GPU). Collective."""
    fields = ("queries", "queries", "shape", "abar", "patch size", "labels", "labels", "machine")
    x_sum, x_order = _bits_checksum(x)
    l_sum, l_order = _bits_checksum(labels) if labels is not None else (0, -1)  # -1: no labels
    mine = [x_sum, x_order, _crc(f"{list(x.shape)} {x.dtype}"), struct.unpack("<q", struct.pack("<d", abar))[0]]
    mine += [patch_size, l_sum, l_order, _crc(machine)]
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    timed("the check that every rank made the same call (all_gather)", dist.all_gather, gathered, local, group=group)
    reference = gathered[0].tolist()
    differ = []
    for rank, values in enumerate(gathered[1:], start=1):
        what = sorted({f for f, a, b in zip(fields, values.tolist(), reference, strict=True) if a != b})
        if what:
            differ.append(f"rank {rank} ({', '.join(what)})")
    if differ:
        raise ValueError(
            f"the ranks of the sharded machine were not given the same call: {'; '.join(differ)} differ from rank "
            "0. Every rank must call denoise with the same x, abar, patch_size and labels, on the same kind of "
            "machine (only the training images are sharded); their answers would otherwise blend"
        )
