"""Adapters that let analytic machines stand in for trained networks in other diffusion libraries.

- `elsfast.integrations.diffusers`: `ELSUNet`, a diffusers model (`ModelMixin` + `ConfigMixin`) that predicts
  epsilon for the pipeline's scheduler; `ELSPipeline`, a pipeline that passes class labels; and
  `ddim_scheduler_config` / `make_ddim_scheduler`, a `DDIMScheduler` that reproduces `elsfast.sample`.
- `elsfast.integrations.k_diffusion`: `ELSDenoiser`, a k-diffusion-style denoiser `D(x, sigma)` in the
  variance-exploding convention, and `get_sigmas_elsfast`, the sigmas that make Euler equal `elsfast.sample`.
- `elsfast.integrations.diffusers_network`: the other way round, a diffusers `UNet2DModel` saved on disk as the
  network that `elsfast.research` calibrates and compares the machines against (`load_diffusers_network`); it
  imports diffusers only when it loads one.

`import elsfast` imports neither. `elsfast.integrations.diffusers` imports diffusers when it is imported (ELSUNet
is a diffusers model); k-diffusion is never imported. An optional library that is installed but fails to import
(e.g. diffusers beside a torchvision built for another torch raises `RuntimeError: operator torchvision::nms does
not exist`) is treated like a missing one: `optional_import` records the reason, `elsfast info` prints it and the
tests skip with it.

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`, `elsfast.reduce`, `elsfast.machine`,
`elsfast.sampling`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["OPTIONAL_LIBRARIES", "integration_status", "optional_import"]

OPTIONAL_LIBRARIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "diffusers": ("diffusers", ("ConfigMixin", "DiffusionPipeline", "ModelMixin")),
    "k-diffusion": ("k_diffusion", ("sampling",)),
}
"""The libraries the adapters work with: display name -> (import name, attributes the adapters use). diffusers
imports its submodules lazily, so the attributes are fetched too: that is where a broken dependency raises."""


def optional_import(name: str, attributes: tuple[str, ...] = ()) -> tuple[ModuleType | None, str]:
    """Import the module `name` and fetch `attributes` from it; returns `(module, "")`, or `(None, reason)` when it
    is missing or broken.

    Any exception counts, not only ImportError: a library that is installed but cannot be imported (a binary
    built for another torch, a dependency raising at import) is as unusable as a missing one. The reason names the
    exception, e.g. `"RuntimeError: operator torchvision::nms does not exist"`.
    """
    try:
        module = importlib.import_module(name)
        for attribute in attributes:
            getattr(module, attribute)
        return module, ""
    except Exception as err:  # every import failure makes the library unavailable
        message = " ".join(str(err).split()) or "(no message)"
        return None, f"{type(err).__name__}: {message}"


def integration_status() -> dict[str, str]:
    """For each library in `OPTIONAL_LIBRARIES`: `"yes (version)"` or `"no (reason)"`, as `elsfast info` prints."""
    status = {}
    for display, (name, attributes) in OPTIONAL_LIBRARIES.items():
        module, reason = optional_import(name, attributes)
        if module is None:
            status[display] = f"no ({reason})"
        else:
            status[display] = f"yes ({getattr(module, '__version__', 'version unknown')})"
    return status
