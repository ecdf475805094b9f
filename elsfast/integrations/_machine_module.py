"""`MachineModule`: the torch.nn.Module shell shared by the adapters, so that `.to()`, `.cuda()`, `.double()` on
an adapter move or convert the `ScoreMachine` inside it (in place), as they would a network's parameters."""

from __future__ import annotations

import torch

from ..common.checks import check_device
from ..machine import ScoreMachine


class MachineModule(torch.nn.Module):
    def __init__(self, machine: ScoreMachine) -> None:
        super().__init__()
        if not isinstance(machine, ScoreMachine):
            raise TypeError(f"machine must be an elsfast.ScoreMachine, got {type(machine).__name__}")
        self.machine = machine

    @property
    def dtype(self) -> torch.dtype:
        """The machine's compute dtype (pipelines draw their initial noise in it)."""
        return self.machine.dtype

    @property
    def device(self) -> torch.device:
        return self.machine.device

    def to(self, *args, **kwargs):
        """`torch.nn.Module.to`; a device that is not available here (CUDA without CUDA, an index beyond the
        device count, "meta") raises ValueError naming it, before anything moves."""
        device = kwargs.get("device")
        if device is None and args and isinstance(args[0], str | torch.device):
            device = args[0]
        check_device(device)
        return super().to(*args, **kwargs)

    def cuda(self, device: int | torch.device | None = None):
        """`torch.nn.Module.cuda`, with `to`'s clear error where CUDA is not available."""
        check_device(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")
        return super().cuda(device)

    def _apply(self, fn, recurse: bool = True):
        # every nn.Module conversion (.to, .cuda, .cpu, .double, .float) goes through _apply: see what it makes of
        # a float tensor of the machine's kind and move/convert the machine to match (half precision is ignored)
        probe = fn(torch.empty(0, device=self.machine.device, dtype=self.machine.dtype))
        if isinstance(probe, torch.Tensor):
            dtype = probe.dtype if probe.dtype in (torch.float32, torch.float64) else None
            if probe.device != self.machine.device or (dtype is not None and dtype != self.machine.dtype):
                self.machine.to(probe.device, dtype)
        return super()._apply(fn, recurse)
