"""`CheckedDeviceModule`: a `torch.nn.Module` whose `.to()` and `.cuda()` refuse a device that is not available
here with a clear ValueError (`check_device`) before anything moves, instead of torch's AssertionError from deep
inside the conversion (or, for "meta", accepting a device that holds no data). The base of `ScoreMachine` and of
the adapters that wrap one."""

from __future__ import annotations

import torch

from .checks import check_device

__all__ = ["CheckedDeviceModule", "requested_device"]


def requested_device(args: tuple, kwargs: dict) -> torch.device | str | None:
    """The device asked for by the arguments of `torch.nn.Module.to` (`to(device)`, `to(device, dtype)`,
    `to(device=...)`, `to(tensor)`), or None when they name none (`to(dtype)`)."""
    device = kwargs.get("device")
    if device is None and args:
        first = args[0]
        if isinstance(first, str | torch.device | int) and not isinstance(first, bool):
            device = first
        elif isinstance(first, torch.Tensor):
            device = first.device
    if isinstance(device, int):
        device = torch.device("cuda", device)
    return device


class CheckedDeviceModule(torch.nn.Module):
    def to(self, *args, **kwargs):
        """`torch.nn.Module.to`; a device that is not available here (CUDA without CUDA, an index beyond the
        device count, "meta") raises ValueError naming it, before anything moves."""
        check_device(requested_device(args, kwargs))
        return super().to(*args, **kwargs)

    def cuda(self, device: int | torch.device | None = None):
        """`torch.nn.Module.cuda`, with `to`'s clear error where CUDA is not available."""
        check_device(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")
        return super().cuda(device)
