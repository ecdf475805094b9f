"""How novel is a sample? Measures of memorisation and of the patch mosaic (paper section 4, Theorem 4.1).

- `nearest_training`: RMS pixel distance from each sample to its nearest training image, and which one;
  a sample within `memorised_rms` of a training image is a memorised copy.
- `source_regions`: sizes of the 4-connected regions of pixels whose dominant dictionary entry comes from the same
  training image (from a `Provenance`).
- `local_consistency`: fraction of pixels equal to the centre of the L2-nearest dictionary patch to their own
  neighbourhood; Theorem 4.1 says a converged sample scores 1.
- `measure`: all of them per sample, as plain Python values ready for JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..common.checks import check_pixel_range
from ..common.pixels import to_float
from ..common.provenance import Provenance
from ..machine import ScoreMachine

__all__ = [
    "MEMORISED_RMS",
    "local_consistency",
    "measure",
    "nearest_patch_provenance",
    "nearest_training",
    "source_regions",
]

MEMORISED_RMS = 0.05
"""Default RMS distance (pixel units, images in [-1, 1]) under which a sample counts as a memorised copy."""

NEAREST_ABAR = 1.0 - 1e-6
"""Noise level at which a machine's dominant entry is the L2-nearest dictionary patch (a = 1 - 5e-7)."""


def nearest_training(
    samples: torch.Tensor, train_images: torch.Tensor, *, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest training image of each sample: (RMS distance `[n]`, index `[n]`).

    `samples` `[n, C, H, W]` float in [-1, 1]; `train_images` `[N, C, H, W]` float or uint8, scanned in chunks of
    `chunk` images. The RMS distance is the L2 distance divided by sqrt(C*H*W).
    """
    flat = samples.reshape(samples.shape[0], -1).double()
    best = torch.full((flat.shape[0],), torch.inf, dtype=torch.float64)
    index = torch.zeros(flat.shape[0], dtype=torch.int64)
    for start in range(0, train_images.shape[0], chunk):
        block = to_float(train_images[start : start + chunk], torch.float64).reshape(-1, flat.shape[1])
        d, i = torch.cdist(flat, block.to(flat.device)).min(dim=1)
        better = d < best
        best = torch.where(better, d, best)
        index = torch.where(better, i + start, index)
    return best / flat.shape[1] ** 0.5, index


def source_regions(source_image: torch.Tensor) -> list[list[int]]:
    """Sizes (largest first) of the 4-connected same-source regions of each sample; `source_image` `[n, H, W]`."""
    result = []
    for grid in source_image.cpu().tolist():
        H, W = len(grid), len(grid[0])
        seen = [[False] * W for _ in range(H)]
        sizes = []
        for y0 in range(H):
            for x0 in range(W):
                if seen[y0][x0]:
                    continue
                seen[y0][x0] = True
                stack, size = [(y0, x0)], 0
                while stack:
                    y, x = stack.pop()
                    size += 1
                    for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                        if 0 <= ny < H and 0 <= nx < W and not seen[ny][nx] and grid[ny][nx] == grid[y0][x0]:
                            seen[ny][nx] = True
                            stack.append((ny, nx))
                sizes.append(size)
        result.append(sorted(sizes, reverse=True))
    return result


def nearest_patch_provenance(
    machine: ScoreMachine, images: torch.Tensor, patch_size: int = 3, labels: Sequence[int] | None = None
) -> Provenance:
    """Provenance of arbitrary images `[n, C, H, W]`: each pixel's L2-nearest dictionary entry (the machine's
    dominant entry as abar -> 1)."""
    _, prov = machine.denoise(images, NEAREST_ABAR, patch_size, labels, return_provenance=True)
    return prov


def local_consistency(
    machine: ScoreMachine,
    samples: torch.Tensor,
    patch_size: int = 3,
    labels: Sequence[int] | None = None,
    *,
    tol: float = 0.05,
) -> torch.Tensor:
    """Fraction `[n]` of pixels whose every channel is within `tol` of the centre of the L2-nearest dictionary
    patch to the pixel's own P x P neighbourhood (Theorem 4.1 of the paper)."""
    prov = nearest_patch_provenance(machine, samples, patch_size, labels)
    centre = to_float(machine.images[prov.source_image, :, prov.source_y, prov.source_x], samples.dtype)  # [n,H,W,C]
    close = (centre.permute(0, 3, 1, 2) - samples.to(centre)).abs() <= tol
    return close.all(dim=1).flatten(1).double().mean(dim=1)


def measure(
    machine: ScoreMachine,
    samples: torch.Tensor,
    *,
    patch_size: int = 3,
    labels: Sequence[int] | None = None,
    provenance: Provenance | None = None,
    memorised_rms: float = MEMORISED_RMS,
) -> list[dict]:
    """Creativity measures of each sample `[n, C, H, W]`, one dict per sample.

    `samples` must be float in [-1, 1] (ValueError otherwise; a UserWarning for [0, 1]-looking samples).
    `provenance` (e.g. `SampleTrace.provenance` of the `sample` call that made these samples) gives the pixel
    sources; it must be `[n, H, W]` for these n samples (ValueError otherwise); without it they are the nearest
    dictionary patches (`nearest_patch_provenance`). `patch_size` is the P of the consistency check (use the
    last step's P for a multiscale sample). An empty batch gives an empty list.
    """
    if not isinstance(machine, ScoreMachine):
        raise TypeError(f"machine must be the ScoreMachine the samples came from, got {type(machine).__name__}")
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4 or not samples.is_floating_point():
        what = f"{samples.dtype} {list(samples.shape)}" if isinstance(samples, torch.Tensor) else type(samples)
        raise ValueError(f"samples must be a float tensor [n, C, H, W] in [-1, 1], got {what}")
    if tuple(samples.shape[1:]) != machine.image_shape:
        raise ValueError(
            f"samples are [C, H, W] = {list(samples.shape[1:])} but the machine's training images are "
            f"{list(machine.image_shape)}"
        )
    check_pixel_range(samples, "samples")
    if provenance is not None:
        if not isinstance(provenance, Provenance):
            raise TypeError(
                f"provenance must be an elsfast Provenance (trace.provenance of sample(..., "
                f"return_provenance=True)), got {type(provenance).__name__}"
            )
        expected = (samples.shape[0], *samples.shape[2:])
        found = tuple(provenance.source_image.shape)
        if found != expected:
            raise ValueError(
                f"provenance is for a batch of shape [n, H, W] = {list(found)} but the samples need "
                f"{list(expected)}: pass the provenance of these samples (trace.provenance of "
                "sample(..., return_provenance=True)), or none"
            )
    if samples.shape[0] == 0:
        return []
    samples = samples.to(machine.device)
    rms, nearest = nearest_training(samples, machine.images)
    if provenance is None:
        provenance = nearest_patch_provenance(machine, samples, patch_size, labels)
    regions = source_regions(provenance.source_image)
    consistency = local_consistency(machine, samples, patch_size, labels)
    pixels = samples.shape[2] * samples.shape[3]
    out = []
    for k in range(samples.shape[0]):
        sources = provenance.source_image[k].flatten()
        out.append(
            {
                "nearest_training_index": int(nearest[k]),
                "nearest_training_rms": float(rms[k]),
                "memorised": bool(rms[k] < memorised_rms),
                "distinct_sources": int(sources.unique().numel()),
                "region_sizes": regions[k],
                "mean_region_size": sum(regions[k]) / len(regions[k]),
                "largest_region_fraction": regions[k][0] / pixels,
                "local_consistency": float(consistency[k]),
                "mean_entropy_nats": float(provenance.entropy[k].double().mean()),
            }
        )
    return out
