"""A machine as a k-diffusion denoiser `D(x, sigma)` in the variance-exploding (Karras) convention.

k-diffusion's samplers (`sample_euler`, `sample_heun`, `sample_dpmpp_2m`, ...) work with x = x0 + sigma * noise
and a model `model(x, sigma * s_in, **extra_args) -> x0`. The machine's variance-preserving x_t is the same
point rescaled: x_t = sqrt(abar) x with abar = 1 / (1 + sigma^2) (so sigma = sqrt((1 - abar) / abar)), and
`ELSDenoiser(x, sigma) = machine.denoise(sqrt(abar) x, abar)`.

    from k_diffusion.sampling import sample_euler
    from elsfast.integrations.k_diffusion import ELSDenoiser, get_sigmas_elsfast

    sigmas = get_sigmas_elsfast(20, machine=machine)      # elsfast's grid: abar(i / 20), i = 19..1, then 0
    x = noise * (1 + sigmas[0] ** 2) ** 0.5               # VP noise at t = 19/20, in VE units
    images = sample_euler(ELSDenoiser(machine), x, sigmas, extra_args={"class_labels": labels})

Any other k-diffusion sampler and schedule works the same way; `sigma_min` / `sigma_max` give the range of the
machine's schedule for k-diffusion's `get_sigmas_karras` (or `get_sigmas_exponential`, ...):

    from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m

    denoiser = ELSDenoiser(machine, patch_size="MNIST_ResNet_zeros")
    sigmas = get_sigmas_karras(20, denoiser.sigma_min, denoiser.sigma_max).to(machine.dtype)
    x = torch.randn(4, 1, 28, 28, dtype=machine.dtype) * sigmas[0]        # VE noise: x = x0 + sigma_max * noise
    images = sample_dpmpp_2m(denoiser, x, sigmas, extra_args={"class_labels": labels})

Euler in sigma is exactly elsfast's DDIM sampler (z_next = z + (sigma_next - sigma) (z - D) / sigma is the
DDIM update written for z = x_t / sqrt(abar)), so the lines above reproduce `elsfast.sample(..., steps=20,
noise=noise)` up to float rounding. k-diffusion itself is not needed by this module (and is not imported).

A batch may carry different sigmas (one per sample): the machine evaluates one noise level per call, so the
batch is split by unique sigma and the machine is called once per value. sigma must be positive (k-diffusion's
samplers never evaluate the model at sigma = 0).
"""

from __future__ import annotations

import math

import torch

from ..common.scales import PatchSizeSpec, patch_size_at
from ..common.schedules import get_schedule, t_of_abar
from ..machine import ScoreMachine
from ._machine_module import MachineModule

__all__ = ["ELSDenoiser", "get_sigmas_elsfast", "sigma_of_abar"]


def sigma_of_abar(abar: float) -> float:
    """sigma = sqrt((1 - abar) / abar), the VE noise level of a VP noise level abar."""
    return math.sqrt((1.0 - abar) / abar) if abar > 0 else math.inf


def get_sigmas_elsfast(
    steps: int = 20,
    schedule="cosine-legacy",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    machine: ScoreMachine | MachineModule | None = None,
) -> torch.Tensor:
    """The sigmas of elsfast's DDIM grid, k-diffusion style: sigma(abar(i / steps)) for i = steps - 1, ..., 1,
    then 0 (`steps` values, `steps - 1` model evaluations). Start from `noise * sqrt(1 + sigmas[0] ** 2)`.

    The sigmas are computed in float64 and returned in `dtype` on `device`; by default those of `machine` (a
    `ScoreMachine` or an adapter such as `ELSDenoiser`), so that k-diffusion's loop, which multiplies x by them,
    runs in the machine's dtype; without a machine, float32 on the CPU (k-diffusion's `get_sigmas_*` default).
    Give `dtype` or `machine`, not both."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if machine is not None:
        if dtype is not None:
            raise ValueError("give dtype or machine, not both: the sigmas take the machine's dtype")
        dtype = machine.dtype
        device = machine.device if device is None else device
    abar_of = get_schedule(schedule)
    values = [sigma_of_abar(abar_of(i / steps)) for i in range(steps - 1, 0, -1)] + [0.0]
    sigmas = torch.tensor(values, dtype=torch.float64)
    return sigmas.to(device or "cpu", dtype or torch.float32)


class ELSDenoiser(MachineModule):
    """`forward(x, sigma, class_labels=None) -> x0` for x = x0 + sigma * noise (see the module docstring).

    Args:
        machine: the analytic machine, a submodule; `.to()` on this module moves or converts a copy of it (so a
            machine shared with other adapters is left as it is).
        patch_size: an odd int; a callable of sigma (a float); or, indexed by the equivalent time t with
            abar(t) = 1 / (1 + sigma^2) on `schedule`, a list or the name of a published calibrated list (entry
            round(t * len) clipped to the list, as `elsfast.sample` uses them).
        schedule: the abar(t) schedule that maps sigma to t for list / name patch sizes (and `sigma_min/max`).
    """

    def __init__(self, machine: ScoreMachine, patch_size: PatchSizeSpec = 3, *, schedule="cosine-legacy") -> None:
        super().__init__(machine)
        if not callable(patch_size):
            patch_size_at(patch_size, 1.0)  # an unknown name or an empty list fails here
        get_schedule(schedule)
        self.patch_size, self.schedule = patch_size, schedule

    @property
    def sigma_max(self) -> float:
        """sigma at t = 1 of the schedule (at t = 0.999 if abar(1) = 0), for k-diffusion's `get_sigmas_*`: the
        noise level to start from (`x = sigma_max * noise`): about 80 for the paper's legacy cosine schedule."""
        abar_of = get_schedule(self.schedule)
        return sigma_of_abar(abar_of(1.0) if abar_of(1.0) > 0 else abar_of(0.999))

    @property
    def sigma_min(self) -> float:
        """sigma at t = 0.001 of the schedule, for k-diffusion's `get_sigmas_*`: the last positive noise level
        (the samplers then step to 0 and return the x0 prediction)."""
        return sigma_of_abar(get_schedule(self.schedule)(0.001))

    def t_of_sigma(self, sigma: float) -> float:
        """The time t of the schedule with abar(t) = 1 / (1 + sigma^2)."""
        return t_of_abar(1.0 / (1.0 + sigma * sigma), self.schedule)

    def _denoise(self, x: torch.Tensor, sigma: float, labels: torch.Tensor | None) -> torch.Tensor:
        abar = 1.0 / (1.0 + sigma * sigma)
        if not abar < 1.0:
            raise ValueError(f"sigma = {sigma} is too small: abar = 1 / (1 + sigma^2) rounds to 1")
        size = (
            self.patch_size(sigma)
            if callable(self.patch_size)
            else patch_size_at(self.patch_size, self.t_of_sigma(sigma))
        )
        x0 = self.machine.denoise(x * math.sqrt(abar), abar, size, labels)
        return x0.to(x.device, x.dtype)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """x0 prediction for x `[B, C, H, W]` at noise level sigma: a float, a 0-d tensor or a `[B]` tensor
        (unequal values are evaluated per unique value). `class_labels`: one int or `[B]`."""
        batch = x.shape[0]
        s = torch.as_tensor(sigma).detach().to("cpu", torch.float64).flatten()
        if s.numel() not in (1, batch):
            raise ValueError(f"sigma must be one value or one per sample ({batch}), got {s.numel()}")
        if not (torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"sigma must be positive and finite, got {s.tolist()}")
        labels = class_labels
        if isinstance(labels, int):
            labels = torch.full((batch,), labels, dtype=torch.int64)
        elif labels is not None:
            labels = torch.as_tensor(labels).flatten().cpu()
        values = s.unique()
        if values.numel() == 1:
            return self._denoise(x, values.item(), labels)
        out = torch.empty_like(x)
        for value in values.tolist():
            rows = (s == value).nonzero().flatten()
            out[rows.to(x.device)] = self._denoise(
                x[rows.to(x.device)], value, None if labels is None else labels[rows]
            )
        return out

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size!r}, schedule={self.schedule!r}"
