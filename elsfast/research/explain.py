"""Explain samples: sample with provenance, write one figure per sample and the creativity measures.

`explain` samples with a machine (as `elsfast.sample`, with provenance), writes one provenance figure per sample
(`elsfast.plots.provenance`: the sample, its source map, the offset colour wheel, the entropy over t, the largest
sources) and the creativity measures (`elsfast.research.creativity.measure`) as `measures.json`. The figures
need matplotlib (`pip install elsfast[plots]`); without it the measures are written all the same and every
figure is skipped, with a warning that says why.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import sampling
from ..common.checks import labels_per_sample
from ..common.fileio import atomic_write, check_replaceable
from ..common.scales import PatchSizeSpec
from ..machine import ScoreMachine
from ..plots.provenance import PALETTE, palette_colour, provenance_figure, save_provenance_figure
from ..plots.style import check_figure_path, matplotlib_missing
from . import creativity

__all__ = ["PALETTE", "default_scale", "explain", "explain_figure", "palette_colour", "save_explain_figure"]

explain_figure = provenance_figure
"""The provenance figure of one sample (a matplotlib `Figure`): `elsfast.plots.provenance.provenance_figure`."""
save_explain_figure = save_provenance_figure
"""Write the provenance figure (PNG, SVG or PDF by the extension): `elsfast.plots.provenance.save_provenance_figure`."""


def default_scale(image_shape: Sequence[int]) -> int:
    """Figure upscaling for images of this `[C, H, W]`: 4 up to 32 px, 2 up to 64 px, else 1."""
    side = max(image_shape[-2:])
    return 4 if side <= 32 else 2 if side <= 64 else 1


def explain(
    machine: ScoreMachine,
    n: int = 4,
    *,
    seed: int = 0,
    steps: int = 20,
    patch_size: PatchSizeSpec = 3,
    labels: int | Sequence[int] | torch.Tensor | None = None,
    out_dir: str | Path,
    schedule: str = "cosine-legacy",
    progress: bool = True,
    top: int = 4,
    scale: int | None = None,
    figure_format: str = "png",
) -> list[dict]:
    """Sample `n` images with `machine` (as `elsfast.sample`, with provenance) and explain each one.

    Writes `out_dir/sample_{k}.png` (`explain_figure`; `figure_format` "svg" or "pdf" for vector figures) for
    every sample and then `out_dir/measures.json`: the `creativity.measure` dict of every sample (consistency
    checked at the last step's patch size) with the sample index, seed, label, figure file and the machine and
    sampling settings added. Returns those dicts. `scale` defaults to `default_scale` of the images. Without
    matplotlib the figures are skipped (a warning says why; `figure` is None in the dicts).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a directory")
    check_figure_path(f"sample.{figure_format}")
    figures = [f"sample_{k}.{figure_format.lower()}" for k in range(n)]
    for name in figures:  # before sampling: a foreign file there would be refused at the end
        check_replaceable(out_dir / name, "figure")
    check_replaceable(out_dir / "measures.json", "measures")
    sample_labels = labels_per_sample(labels, n)
    images, trace = sampling.sample(
        machine,
        n,
        steps=steps,
        patch_size=patch_size,
        labels=sample_labels,
        seed=seed,
        schedule=schedule,
        progress=progress,
        return_provenance=True,
    )
    measures = creativity.measure(
        machine, images, patch_size=trace.patch_sizes[-1], labels=sample_labels, provenance=trace.provenance
    )
    settings = {
        "machine": machine.machine,
        "padding": machine.padding,
        "backend": machine.backend,
        "dtype": str(machine.dtype).removeprefix("torch."),
        "train_shape": list(machine.images.shape),
        "train_sha256": machine.fingerprint,
        "dataset": machine.source,
        "steps": steps,
        "schedule": schedule if isinstance(schedule, str) else repr(schedule),
        "patch_sizes": list(trace.patch_sizes),
        "times": list(trace.times),
    }
    scale = default_scale(machine.image_shape) if scale is None else scale
    images, provenance, entropy = images.cpu(), trace.provenance, trace.entropy.cpu()
    size_text = "whole images" if machine.machine in ("is", "es") else _sizes_text(trace.patch_sizes)
    skipped = matplotlib_missing()
    if skipped is not None:
        warnings.warn(f"explain: figures skipped, measures.json written: {skipped}", stacklevel=2)
    out = []
    for k, m in enumerate(measures):
        label = None if sample_labels is None else int(sample_labels[k])
        figure = None if skipped is not None else figures[k]
        title = (
            f"sample {k} (seed {seed}{'' if label is None else f', class {label}'}): {machine.machine.upper()} "
            f"machine, {machine.padding} padding, {size_text}, {steps} steps"
        )
        if figure is not None:
            save_provenance_figure(
                out_dir / figure,
                images[k],
                provenance[k],
                machine.images,
                entropy_over_time=entropy[:, k],
                times=trace.times,
                top=top,
                scale=scale,
                title=title,
                wrap=machine.padding == "circular",
            )
        out.append({"sample": k, "seed": seed, "label": label, "figure": figure, **m, **settings})
    text = (json.dumps(out, indent=2) + "\n").encode()
    atomic_write(out_dir / "measures.json", lambda f: f.write(text), kind="measures")
    return out


def _sizes_text(sizes: Sequence[int]) -> str:
    distinct = sorted(set(sizes))
    if len(distinct) == 1:
        return f"P={distinct[0]}"
    return f"P={sizes[0]}..{sizes[-1]}"
