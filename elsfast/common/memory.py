"""Memory available here, and the up-front check that a batch of outputs fits in it.

`available_bytes(device)`: on the CPU the kernel's estimate of memory available without swapping
(`MemAvailable`), lowered to what an address-space limit (`ulimit -v`, `RLIMIT_AS`) still leaves this process;
on a CUDA device its free memory. `check_batch_memory` refuses a batch whose tensors cannot fit, before any of
them is allocated, with a ValueError naming the bytes and the largest batch that fits.
"""

from __future__ import annotations

import os
import resource

import torch

__all__ = ["available_bytes", "check_batch_memory", "format_bytes"]


def format_bytes(count: float) -> str:
    """`count` bytes for a message, in binary units: "512 B", "6.3 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _address_space_left() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        used = 0
    return max(0, soft - used)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on `device` (see the module docstring); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    known = [b for b in (_mem_available(), _address_space_left()) if b is not None]
    return min(known) if known else None


def check_batch_memory(what: str, count: int, bytes_per_item: int, device: torch.device | str = "cpu") -> None:
    """ValueError when `count` items of `bytes_per_item` each (every tensor the batch keeps, counted once) exceed
    `available_bytes(device)`, naming `what`, the bytes and the largest count that fits; nothing when unknown."""
    free = available_bytes(device)
    need = count * bytes_per_item
    if free is None or need <= free:
        return
    raise ValueError(
        f"{what} = {count:,} needs about {format_bytes(need)} ({format_bytes(bytes_per_item)} each), more than "
        f"the {format_bytes(free)} of memory available on {torch.device(device)}; ask for at most "
        f"{max(0, free // bytes_per_item):,} at a time"
    )
