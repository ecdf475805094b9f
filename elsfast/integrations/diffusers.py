"""Use an analytic machine where a diffusers `UNet2DModel` is used: `ELSUNet` predicts epsilon.

    from diffusers import DDIMPipeline, DDIMScheduler
    from elsfast.integrations.diffusers import ELSUNet

    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True)
    pipe = DDIMPipeline(unet=ELSUNet(machine, scheduler, patch_size="MNIST_ResNet_zeros"), scheduler=scheduler)
    images = pipe(batch_size=4, num_inference_steps=19, generator=torch.Generator().manual_seed(0)).images

diffusers is imported lazily (only for the output class `UNet2DOutput`; without diffusers a small dataclass
with the same `.sample` field is returned), so this module imports without it.

How a timestep becomes a noise level. `ELSUNet` copies `alphas_cumprod` from the scheduler it is paired with
(exactly the scheduler's float32 values, so that its epsilon and the scheduler's x0 reconstruction use the same
abar and the scheduler recovers the machine's x0 up to rounding). An integer timestep j
uses `alphas_cumprod[j]`; a fractional one (Euler-type schedulers) interpolates sigma = sqrt((1 - abar) / abar)
linearly between the neighbours, as those schedulers do. An abar of 0 (zero-terminal-SNR schedules) is raised to
1e-12. The patch size is chosen from the time t = (j + 1) / num_train_timesteps: diffusers' training timestep
j is the end of the (j + 1)-th of num_train_timesteps intervals, e.g. `beta_schedule="squaredcos_cap_v2"` has
`alphas_cumprod[j] = abar((j + 1) / N)` of elsfast's "cosine" schedule. (t = j / N would shift a published
20-entry P(t) list by one step when N = 20.)

Scheduler settings that matter (ELSUNet refuses other prediction types and warns about clip_sample=True,
thresholding=True and set_alpha_to_one=False):

- `clip_sample=False`: the paper's sampler never clips the x0 prediction (diffusers' default is True);
- `prediction_type="epsilon"`: ELSUNet returns epsilon;
- `set_alpha_to_one=True` (DDIM): the last step lands on abar = 1, so the output is the machine's x0 prediction;
  with False it lands on alphas_cumprod[0] and keeps a little noise;
- `timestep_spacing` / `steps_offset`: which training timesteps the inference steps visit. "leading" visits
  j = m * (N // num_inference_steps) + steps_offset, m = 0, 1, ...; "trailing" starts at N - 1; "linspace"
  rounds an even grid from 0 to N - 1. Stock cosine schedulers (`squaredcos_cap_v2`) follow elsfast's "cosine"
  schedule, not the paper's "cosine-legacy": use `ddim_scheduler_config` (or its `trained_betas`) for the latter.

Reproducing `elsfast.sample(..., steps=n)` exactly: `make_ddim_scheduler(n, schedule, substeps=k)` (or
`DDIMScheduler(**ddim_scheduler_config(n, schedule, k))`) builds a DDIMScheduler with N = n * k training
timesteps whose `trained_betas` make `alphas_cumprod[j] = abar((j + 1) / N)`, `timestep_spacing="leading"` and
`steps_offset=k - 1`; with `num_inference_steps = n - 1` it visits j = i * k - 1, i.e. abar(i / n) for
i = n - 1, ..., 1, and lands on abar = 1, like elsfast's sampler. With the same noise (the pipeline draws it as
`elsfast.sample` does: `torch.randn([n, C, H, W], generator=g, dtype=machine.dtype)` on the CPU) the images agree
up to the float32 rounding of diffusers' alphas_cumprod, which the sampler amplifies: measured worst 2.5e-5
(float64 machine) and 5e-4 (float32 machine) in [-1, 1] units; with exact float64 alphas_cumprod, 1e-15
(`tests/test_integrations.py`).

`ELSUNet.to(...)`, `.cuda()`, `.double()` move or convert the machine (in place: it is shared, not copied);
half precision is ignored (machines compute in float32 or float64; outputs take the input's dtype).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cache

import torch

from ..machine import ScoreMachine
from ..ode import patch_size_at
from ..scales import PatchSizeSpec
from ..schedules import get_schedule
from ._machine_module import MachineModule

__all__ = ["ELSUNet", "ELSUNetOutput", "ddim_scheduler_config", "make_ddim_scheduler"]

_MIN_ABAR = 1e-12


@dataclass
class ELSUNetOutput:
    """What `ELSUNet.forward` returns when diffusers is not installed (diffusers' `UNet2DOutput` otherwise)."""

    sample: torch.Tensor


@cache
def _output_class() -> type:
    try:
        from diffusers.models.unets.unet_2d import UNet2DOutput
    except ImportError:
        try:
            from diffusers.models.unet_2d import UNet2DOutput  # diffusers < 0.26
        except ImportError:
            return ELSUNetOutput
    return UNet2DOutput


class _Config(dict):
    """A dict with attribute access, like diffusers' `FrozenDict` (`unet.config.sample_size`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _check_scheduler_config(config) -> None:
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"ELSUNet predicts epsilon but the scheduler has prediction_type={prediction!r}: "
            "configure it with prediction_type='epsilon'"
        )
    if config.get("clip_sample", False):
        warnings.warn(
            "the scheduler clips x0 predictions to [-1, 1] (clip_sample=True); the paper's sampler does not: "
            "pass clip_sample=False to reproduce it",
            stacklevel=3,
        )
    if config.get("thresholding", False):
        warnings.warn("the scheduler uses dynamic thresholding, which the paper's sampler does not", stacklevel=3)
    if config.get("set_alpha_to_one", True) is False:
        warnings.warn(
            "set_alpha_to_one=False: the last DDIM step lands on alphas_cumprod[0] instead of abar = 1, so the "
            "output is not the machine's x0 prediction",
            stacklevel=3,
        )


class ELSUNet(MachineModule):
    """A `ScoreMachine` as a diffusers-style epsilon-prediction network (see the module docstring).

    Args:
        machine: the analytic machine; `.to()` on this module moves it (in place).
        scheduler: the diffusers scheduler (DDIM, DDPM, ...) whose `alphas_cumprod` and `num_train_timesteps`
            define the noise level of each timestep; it must predict epsilon.
        patch_size: an odd int; a callable of t = (timestep + 1) / num_train_timesteps; a list or the name of a
            published calibrated list (`elsfast.reference_scales()`), entry round(t * len) clipped to the list.
    """

    def __init__(self, machine: ScoreMachine, scheduler, patch_size: PatchSizeSpec = 3) -> None:
        super().__init__(machine)
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise TypeError(
                f"scheduler must have alphas_cumprod (a diffusers DDIMScheduler, DDPMScheduler, ...), "
                f"got {type(scheduler).__name__}"
            )
        config = getattr(scheduler, "config", None) or {}
        _check_scheduler_config(config)
        self.alphas_cumprod = torch.as_tensor(alphas).detach().to("cpu", torch.float64).flatten()
        self.num_train_timesteps = int(config.get("num_train_timesteps", self.alphas_cumprod.numel()))
        if self.num_train_timesteps != self.alphas_cumprod.numel():
            raise ValueError(
                f"the scheduler has num_train_timesteps={self.num_train_timesteps} but "
                f"{self.alphas_cumprod.numel()} alphas_cumprod"
            )
        if not callable(patch_size):
            patch_size_at(patch_size, 1.0)  # an unknown name or an empty list fails here, not mid-sampling
        self.patch_size = patch_size
        c, h, w = machine.image_shape
        self.config = _Config(
            sample_size=h if h == w else (h, w),
            in_channels=c,
            out_channels=c,
            num_train_timesteps=self.num_train_timesteps,
            machine=machine.machine,
            padding=machine.padding,
        )

    def _timestep(self, timestep, batch: int) -> float:
        if isinstance(timestep, torch.Tensor):
            flat = timestep.detach().flatten()
            if flat.numel() == 0:
                raise ValueError("timestep is an empty tensor")
            if flat.numel() > 1:
                if flat.numel() != batch:
                    raise ValueError(f"timestep must be one value or one per sample ({batch}), got {flat.numel()}")
                if not bool((flat == flat[0]).all()):
                    raise ValueError(
                        f"ELSUNet evaluates one noise level per call: all timesteps must be equal, got {flat.tolist()}"
                    )
            timestep = flat[0].item()
        value = float(timestep)
        if not (math.isfinite(value) and 0 <= value <= self.num_train_timesteps - 1):
            raise ValueError(f"timestep must lie in [0, {self.num_train_timesteps - 1}], got {timestep}")
        return value

    def abar(self, timestep: float) -> float:
        """abar of a (possibly fractional) timestep: `alphas_cumprod[j]`, or sigma interpolated between two."""
        lo = math.floor(timestep)
        frac = timestep - lo
        if frac == 0:
            abar = self.alphas_cumprod[lo].item()
        else:
            a0, a1 = self.alphas_cumprod[lo].item(), self.alphas_cumprod[lo + 1].item()
            s0, s1 = (math.sqrt((1 - a) / max(a, _MIN_ABAR)) for a in (a0, a1))
            abar = 1.0 / (1.0 + ((1 - frac) * s0 + frac * s1) ** 2)
        return max(abar, _MIN_ABAR)

    def time(self, timestep: float) -> float:
        """t = (timestep + 1) / num_train_timesteps, clipped to [0, 1]: the time the patch-size spec sees."""
        return min(1.0, max(0.0, (timestep + 1) / self.num_train_timesteps))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | int | None = None,
        return_dict: bool = True,
    ):
        """Epsilon prediction for `sample` `[B, C, H, W]` at `timestep` (an int, a 0-d tensor, or a `[B]` tensor of
        equal values; ValueError otherwise). `class_labels` (`[B]` or one int) select class-conditional
        dictionaries. Returns `UNet2DOutput(sample=eps)` (or `ELSUNetOutput`), or `(eps,)` if not return_dict."""
        value = self._timestep(timestep, sample.shape[0])
        labels = class_labels
        if isinstance(labels, int):
            labels = torch.full((sample.shape[0],), labels, dtype=torch.int64)
        elif labels is not None:
            labels = torch.as_tensor(labels).flatten()
        size = patch_size_at(self.patch_size, self.time(value))
        eps = self.machine.eps(sample, self.abar(value), size, labels).to(sample.device, sample.dtype)
        if not return_dict:
            return (eps,)
        return _output_class()(sample=eps)

    def extra_repr(self) -> str:
        return (
            f"machine={self.machine!r}, num_train_timesteps={self.num_train_timesteps}, patch_size={self.patch_size!r}"
        )


def ddim_scheduler_config(steps: int = 20, schedule="cosine-legacy", substeps: int = 1) -> dict:
    """DDIMScheduler arguments that reproduce `elsfast.sample(..., steps=steps, schedule=schedule)` when the
    pipeline runs `num_inference_steps = steps - 1` (see the module docstring). `substeps` k puts k training
    timesteps between two inference steps (N = steps * k; needs k < steps - 1 unless steps == 2)."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if substeps < 1 or (steps > 2 and substeps >= steps - 1):
        raise ValueError(f"substeps must lie in [1, {max(1, steps - 2)}] for {steps} steps, got {substeps}")
    abar_of = get_schedule(schedule)
    n = steps * substeps
    betas, prev = [], 1.0  # alphas_cumprod[j] = prod_{l <= j} (1 - beta_l) = abar((j + 1) / n)
    for j in range(n):
        cur = abar_of((j + 1) / n)
        betas.append(min(1.0, max(0.0, 1.0 - cur / prev)) if prev > 0 else 1.0)
        prev = cur
    return {
        "num_train_timesteps": n,
        "trained_betas": betas,
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": substeps - 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }


def make_ddim_scheduler(steps: int = 20, schedule="cosine-legacy", substeps: int = 1):
    """A diffusers `DDIMScheduler(**ddim_scheduler_config(steps, schedule, substeps))`; run it with
    `num_inference_steps = steps - 1`."""
    try:
        from diffusers import DDIMScheduler
    except ImportError as err:
        raise ImportError("make_ddim_scheduler needs diffusers: pip install 'elsfast[diffusers]'") from err
    return DDIMScheduler(**ddim_scheduler_config(steps, schedule, substeps))
