"""The noise level a diffusers scheduler gives a timestep, and the model output it expects.

A diffusers scheduler holds its noise levels in one of two tables:

- `alphas_cumprod[j]` of the N training timesteps (DDIM, DDPM, PNDM, ...): an integer timestep j has
  abar = alphas_cumprod[j]; a fractional one interpolates sigma = sqrt((1 - abar) / abar) linearly between the
  neighbours, as diffusers' Euler-type schedulers do for their own timesteps;
- `sigmas` of the current inference steps (Euler, Heun, KDPM2, LMS, DPM-Solver, ...), indexed by the scheduler's
  `step_index`: those schedulers scale the model input by 1 / sqrt(1 + sigma^2) and step with that sigma, and
  their sigmas need not be the interpolation of alphas_cumprod at the (rounded) timestep: Karras sigmas,
  KDPM2's log-sigma midpoints. The model then uses abar = 1 / (1 + sigma^2) of that table, so that its noise
  level is the scheduler's to float rounding.

`prediction_type` is what the model returns, converted exactly from the machine's x0 prediction D at abar:
"epsilon" (x - sqrt(abar) D) / sqrt(1 - abar), "sample" D, "v_prediction" sqrt(abar) eps - sqrt(1 - abar) D
(`convert_prediction`); and back, a network's output to epsilon (`eps_from_prediction`): "sample" x0 gives
(x - sqrt(abar) x0) / sqrt(1 - abar), "v_prediction" v gives sqrt(abar) v + sqrt(1 - abar) x, for
x = sqrt(abar) x0 + sqrt(1 - abar) eps.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = [
    "MIN_ABAR",
    "PREDICTION_TYPES",
    "check_prediction_type",
    "check_scheduler",
    "convert_prediction",
    "eps_from_prediction",
    "table_abar",
]

MIN_ABAR = 1e-12
"""abar below this (zero-terminal-SNR schedules) is raised to it."""

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def scheduler_config(scheduler) -> dict:
    """The scheduler's config as a dict ({} when it has none)."""
    config = getattr(scheduler, "config", None)
    return dict(config) if config is not None else {}


def check_prediction_type(config: dict, who: str, hint: str = "") -> str:
    """The scheduler config's `prediction_type` (default "epsilon"); ValueError beginning with `who` (e.g.
    "ELSUNet predicts") and ending with `hint` unless it is one of `PREDICTION_TYPES`."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"{who} {', '.join(PREDICTION_TYPES)}, but the scheduler has prediction_type={prediction!r}{hint}"
        )
    return prediction


def check_scheduler(scheduler) -> None:
    """Raise unless `scheduler` has an `alphas_cumprod` schedule and a prediction type in `PREDICTION_TYPES`;
    warn about settings the paper does not use."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise TypeError(
            f"scheduler must have alphas_cumprod (a diffusers DDIMScheduler, DDPMScheduler, ...), "
            f"got {type(scheduler).__name__}"
        )
    config = scheduler_config(scheduler)
    n = int(config.get("num_train_timesteps", len(alphas)))
    if n != len(alphas):
        raise ValueError(f"the scheduler has num_train_timesteps={n} but {len(alphas)} alphas_cumprod")
    check_prediction_type(config, "ELSUNet predicts", ": configure it with prediction_type='epsilon'")
    if config.get("clip_sample", False):
        warnings.warn(
            "the scheduler clips x0 predictions to [-1, 1] (clip_sample=True); the paper's sampler does not: "
            "pass clip_sample=False to reproduce it",
            stacklevel=4,
        )
    if config.get("thresholding", False):
        warnings.warn("the scheduler uses dynamic thresholding, which the paper's sampler does not", stacklevel=4)
    if config.get("set_alpha_to_one", True) is False:
        warnings.warn(
            "set_alpha_to_one=False: the last DDIM step lands on alphas_cumprod[0] instead of abar = 1, so the "
            "output is not the machine's x0 prediction",
            stacklevel=4,
        )


def _sigma_table_abar(scheduler, timestep: float) -> float | None:
    """abar = 1 / (1 + sigma^2) of the scheduler's current `sigmas` entry when the scheduler has such a table and
    `timestep` is the one of its current step (`timesteps[step_index]`, or of the step it would start from);
    None otherwise."""
    sigmas = getattr(scheduler, "sigmas", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(sigmas, torch.Tensor) or not isinstance(timesteps, torch.Tensor) or sigmas.dim() != 1:
        return None
    index = getattr(scheduler, "step_index", None)
    if index is None:  # before the first step (DPM-Solver steps before it scales): the index the scheduler will take
        index = getattr(scheduler, "begin_index", None)
        if index is None:
            finder = getattr(scheduler, "index_for_timestep", None)
            if finder is None:
                return None
            index = int(finder(torch.tensor(timestep, dtype=timesteps.dtype, device=timesteps.device)))
    if not 0 <= index < min(len(sigmas), len(timesteps)) or float(timesteps[index]) != timestep:
        return None
    table = sigmas
    if getattr(scheduler, "state_in_first_order", True) is False:  # KDPM2's second stage
        table = getattr(scheduler, "sigmas_interpol", sigmas)
    sigma = float(table[index])
    return 1.0 / (1.0 + sigma * sigma)


def table_abar(scheduler, timestep: float) -> float:
    """abar of a (possibly fractional) `timestep` of `scheduler`: from its `sigmas` table at the current step when
    it has one (see the module docstring), else from `alphas_cumprod`. At least `MIN_ABAR`."""
    abar = _sigma_table_abar(scheduler, timestep)
    if abar is None:
        alphas = scheduler.alphas_cumprod
        lo = math.floor(timestep)
        frac = timestep - lo
        if frac == 0:
            abar = float(alphas[lo])
        else:
            a0, a1 = float(alphas[lo]), float(alphas[lo + 1])
            s0, s1 = (math.sqrt((1 - a) / max(a, MIN_ABAR)) for a in (a0, a1))
            abar = 1.0 / (1.0 + ((1 - frac) * s0 + frac * s1) ** 2)
    return max(abar, MIN_ABAR)


def convert_prediction(x: torch.Tensor, x0: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """The model output of `prediction_type` for input x `[B, C, H, W]` whose x0 prediction is `x0` (same shape
    and dtype) at noise level abar (see the module docstring)."""
    if prediction_type == "sample":
        return x0
    eps = (x - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return math.sqrt(abar) * eps - math.sqrt(1.0 - abar) * x0
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def eps_from_prediction(x: torch.Tensor, output: torch.Tensor, abar: float, prediction_type: str) -> torch.Tensor:
    """The epsilon a network's `output` of `prediction_type` implies for input x `[B, C, H, W]` (same shape) at
    noise level abar in (0, 1) (see the module docstring): the inverse of `convert_prediction`."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        return (x - math.sqrt(abar) * output) / math.sqrt(1.0 - abar)
    if prediction_type == "v_prediction":
        return math.sqrt(abar) * output + math.sqrt(1.0 - abar) * x
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
