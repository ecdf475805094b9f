"""`MachineModule`: the torch.nn.Module shell shared by the adapters. The `ScoreMachine` inside is a submodule;
`.to()`, `.cuda()`, `.double()` on an adapter give the adapter its own converted machine (copy-on-convert: a
`copy.copy` of the machine, sharing its training set until converted) and leave the machine it was given, and every
other adapter sharing it, as they were."""

from __future__ import annotations

import copy

import torch

from ..common.modules import CheckedDeviceModule
from ..machine import ScoreMachine


class MachineModule(CheckedDeviceModule):
    def __init__(self, machine: ScoreMachine) -> None:
        super().__init__()
        if not isinstance(machine, ScoreMachine):
            raise TypeError(f"machine must be an elsfast.ScoreMachine, got {type(machine).__name__}")
        self.machine = machine

    @property
    def machine(self) -> ScoreMachine:
        """The machine (a submodule: `named_buffers()` and `state_dict()` hold its training set as
        `machine.images` / `machine.labels`). Read from the module table directly, because diffusers' models
        answer a missing attribute with their config entry of the same name (the machine's configuration)."""
        return self._modules["machine"]

    @property
    def dtype(self) -> torch.dtype:
        """The machine's compute dtype (pipelines draw their initial noise in it)."""
        return self.machine.dtype

    @property
    def device(self) -> torch.device:
        return self.machine.device

    def _apply(self, fn, recurse: bool = True):
        # every nn.Module conversion (.to, .cuda, .cpu, .double, .float) goes through _apply: see what it makes of
        # a float tensor of the machine's kind; where the machine would change, convert a copy of it (half
        # precision is ignored: the machine keeps computing in float32 or float64), never the shared one
        machine = self.machine
        probe = fn(torch.empty(0, device=machine.images.device, dtype=machine.dtype))
        dtype = probe.dtype if probe.dtype in (torch.float32, torch.float64) else machine.dtype
        if probe.device != machine.images.device or dtype != machine.dtype:
            self.machine = copy.copy(machine).to(probe.device, dtype)
        elif probe.dtype == machine.dtype:  # not a conversion (share_memory, ...): the machine's own tensors
            machine._apply(fn)
        if recurse:
            for child in self.children():
                if child is not self.machine:
                    child._apply(fn)
        return super()._apply(fn, recurse=False)
