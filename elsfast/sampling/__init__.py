"""Sampling: turning noise into images with a denoiser (a machine or a network).

- `ddim`: the one deterministic DDIM sampler (`ddim_sample`), for machines and networks alike;
- `sampler`: `sample()`, images from an analytic machine in one call, and its `SampleTrace`;
- `checkpoint`: `SamplingCheckpoint`, the file a sampling run resumes from;
- `estimate`: the pairs and time a run will take, printed before long runs;
- `ode`: the probability-flow ODE of the same process (score, velocity, Euler).

May import `elsfast.common`, `elsfast.reduce` and `elsfast.machine`; never `nets`, `research`, `cli`.

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`, `elsfast.reduce`, `elsfast.machine`.
"""

from .checkpoint import SamplingCheckpoint
from .ddim import Denoiser, StepCallback, ddim_sample
from .estimate import estimate_sample
from .sampler import SampleTrace, sample

__all__ = [
    "Denoiser",
    "SampleTrace",
    "SamplingCheckpoint",
    "StepCallback",
    "ddim_sample",
    "estimate_sample",
    "sample",
]
