"""Adapters that let analytic machines stand in for trained networks in other diffusion libraries.

- `elsfast.integrations.diffusers`: `ELSUNet`, a drop-in for a diffusers `UNet2DModel` (epsilon prediction),
  and `ddim_scheduler_config` / `make_ddim_scheduler`, a `DDIMScheduler` that reproduces `elsfast.sample`.
- `elsfast.integrations.k_diffusion`: `ELSDenoiser`, a k-diffusion-style denoiser `D(x, sigma)` in the
  variance-exploding convention, and `get_sigmas_elsfast`, the sigmas that make Euler equal `elsfast.sample`.

Neither submodule imports its library at import time: diffusers is imported only when it is needed (the output
class), and k-diffusion is never imported.
"""
