"""The figures of `elsfast.research.departure`: where a network's image leaves a machine's patch mosaic (paper
Figs. 23/24).

`departure_figure`: one seed, side by side: (a) the network's image, (b) the machine's, (c) the departure map
|network - machine| (averaged over channels; colour bar in pixel units of images in [-1, 1]) and (d) the machine's
provenance: every pixel in the colour of the training image it came from (`provenance.source_colours`, the
colours of `elsfast explain`), with black lines between neighbouring pixels from different training images (the
mosaic's boundaries).

`worst_seeds_figure`: the seeds where network and machine agree least, one row each in the layout above (one
colour scale for every departure map), beside the mean departure against the number of a pixel's 4-neighbours
from another training image, per seed and over all seeds (rising: the network departs more where the mosaic is
inconsistent), the rows' seeds in red.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..common.imageio import to_uint8
from ..common.provenance import Provenance
from .provenance import source_colours
from .style import check_figure_path, machine_color, machine_name, new_figure, save_figure, styled

__all__ = [
    "DEPARTURE_CMAP",
    "departure_figure",
    "save_departure_figure",
    "save_worst_seeds_figure",
    "source_map",
    "worst_seeds_figure",
]

DEPARTURE_CMAP = "magma"
"""Colour map of the departure maps (black: the network's pixel equals the machine's)."""


def _rgb(image: torch.Tensor) -> np.ndarray:
    """One image `[C, H, W]` (C = 1 or 3, float in [-1, 1]) -> uint8 `[H, W, 3]`."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"images must be [C, H, W] with C = 1 or 3, got {list(image.shape)}")
    u = to_uint8(image.detach().cpu()[None])[0]
    return u.repeat(3, axis=2) if u.shape[2] == 1 else u


def source_map(provenance: Provenance) -> tuple[np.ndarray, int, np.ndarray]:
    """The provenance panel of one sample: (uint8 RGB `[H, W, 3]`, number of source images, region edges).
    `provenance` holds `[H, W]` tensors. The edges are line segments `[n, 2, 2]` ((x, y) end points in pixel
    coordinates, pixel centres at integers) between 4-neighbours whose sources are different training images."""
    source = provenance.source_image.detach().cpu()
    if source.dim() != 2:
        raise ValueError(f"provenance must be one sample's ([H, W] tensors: index a batch's with prov[k]), got "
                         f"{list(source.shape)}")  # fmt: skip
    ids = source.numpy()
    rgb, order = source_colours(ids)
    ys, xs = np.nonzero(ids[:, 1:] != ids[:, :-1])  # between (y, x) and (y, x + 1): a vertical segment
    vertical = [((x + 0.5, y - 0.5), (x + 0.5, y + 0.5)) for y, x in zip(ys.tolist(), xs.tolist(), strict=True)]
    ys, xs = np.nonzero(ids[1:, :] != ids[:-1, :])  # between (y, x) and (y + 1, x): a horizontal segment
    horizontal = [((x - 0.5, y + 0.5), (x + 0.5, y + 0.5)) for y, x in zip(ys.tolist(), xs.tolist(), strict=True)]
    edges = np.array(vertical + horizontal, dtype=np.float64).reshape(-1, 2, 2)
    return rgb, len(order), edges


def _show(ax, picture, title: str, **kwargs):
    image = ax.imshow(picture, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return image


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _row(axes, panel: dict, machine: str, vmax: float):
    """Draw one seed into 4 axes; returns the departure image (for a colour bar)."""
    name = machine_name(machine)
    depart = panel["departure"].detach().cpu().double().numpy()
    colours, sources, edges = source_map(panel["provenance"])
    contrast = panel.get("contrast")
    r = panel.get("r")
    _show(axes[0], _rgb(panel["network"]), "network" + (f", seed {panel['seed']}" if "seed" in panel else ""))
    _show(axes[1], _rgb(panel["machine_image"]), name + (f", r = {_fmt(r)}" if r is not None else ""))
    note = f"|network - {name}|"
    if contrast is not None:
        note += f"\nboundary/interior {_fmt(contrast.get('ratio'), 2)}"
        if "neighbours" in contrast:
            note += f"\ncorr. with boundaries {_fmt(contrast['neighbours']['pearson'], 2)}"
    image = _show(axes[2], depart, note, cmap=DEPARTURE_CMAP, vmin=0.0, vmax=vmax)
    _show(axes[3], colours, f"{name} sources: {sources} image{'s' * (sources != 1)}")
    if len(edges):
        from matplotlib.collections import LineCollection

        axes[3].add_collection(LineCollection(edges, colors="black", linewidths=0.8))
    return image


def _vmax(departures: Sequence[torch.Tensor]) -> float:
    top = max(float(d.detach().cpu().double().max()) for d in departures)
    return top if top > 0 else 1.0


def departure_figure(
    network: torch.Tensor,
    machine_image: torch.Tensor,
    departure: torch.Tensor,
    provenance: Provenance,
    *,
    machine: str = "els",
    seed: int | None = None,
    r: float | None = None,
    contrast: dict | None = None,
    title: str | None = None,
):
    """A matplotlib `Figure` of one seed: network | machine | departure map | provenance (module docstring).

    `network`, `machine_image`: `[C, H, W]` float in [-1, 1] (C = 1 or 3); `departure` `[H, W]` (e.g.
    `research.departure.departure_map`); `provenance` the machine image's `Provenance` (`[H, W]` tensors);
    `seed`, `r` (the machine's Pearson r with the network)
    and `contrast` (a row's `image` entry of `departure.json`: its `ratio` and, if there, `neighbours.pearson`,
    shown) annotate the panels.
    """
    panel = {"network": network, "machine_image": machine_image, "departure": departure, "provenance": provenance}
    panel.update({k: v for k, v in (("seed", seed), ("r", r), ("contrast", contrast)) if v is not None})
    with styled():
        fig = new_figure(9.0, 2.9)
        axes = fig.subplots(1, 4)
        image = _row(axes, panel, machine, _vmax([departure]))
        bar = fig.colorbar(image, ax=axes[2], shrink=0.8, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        if title is not None:
            fig.suptitle(title, fontsize=11)
    return fig


def worst_seeds_figure(
    panels: Sequence[dict],
    curves: Sequence[tuple[int, Sequence[float | None]]] = (),
    pooled: Sequence[float | None] | None = None,
    *,
    machine: str = "els",
    title: str | None = None,
):
    """A matplotlib `Figure`: one row per seed of `panels` (dicts with the arguments of `departure_figure`:
    `network`, `machine_image`, `departure`, `provenance`, optional `seed`, `r`, `contrast`), their departure maps
    on one colour scale; and, when `curves` are given, the mean departure against the number of a pixel's
    inconsistent 4-neighbours (0..4): one line per seed (`(seed, five means, None where no pixel)`; the seeds of
    `panels` in red) and `pooled` (over all seeds) in black."""
    if not panels:
        raise ValueError("no seeds to draw")
    name = machine_name(machine)
    vmax = _vmax([p["departure"] for p in panels])
    with styled():
        fig = new_figure(8.4 + (3.6 if curves else 0.0), 0.6 + 2.0 * len(panels))
        if curves:
            left, right = fig.subfigures(1, 2, width_ratios=(8.4, 3.6))
        else:
            left, right = fig, None
        axes = np.atleast_2d(left.subplots(len(panels), 4))
        image = None
        for k, panel in enumerate(panels):
            image = _row(axes[k], panel, machine, vmax)
        # below the rows: beside one column, constrained layout in a subfigure let it overlap the next column
        bar = left.colorbar(image, ax=list(axes.ravel()), location="bottom", shrink=0.5, aspect=40, pad=0.01)
        bar.set_label(f"|network - {name}|, mean over channels", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        left.suptitle(
            title
            or f"The {len(panels)} seed{'s' * (len(panels) != 1)} where network and {name} agree least "
            "(lowest r); black lines: mosaic boundaries",
            fontsize=10,
        )
        if right is not None:
            ax = right.subplots()
            shown = {p.get("seed") for p in panels}
            ks = np.arange(5)
            for seed, means in curves:
                y = np.array([np.nan if v is None else v for v in means], dtype=np.float64)
                style = (
                    dict(color="#d62728", alpha=0.9, lw=1.4, marker="o", ms=3, zorder=3)
                    if seed in shown
                    else dict(color=machine_color(machine), alpha=0.3, lw=0.8, zorder=2)
                )
                ax.plot(ks, y, **style)
            if pooled is not None:
                y = np.array([np.nan if v is None else v for v in pooled], dtype=np.float64)
                ax.plot(ks, y, color="black", lw=2.2, marker="s", ms=4, label="all seeds' pixels", zorder=4)
            ax.plot([], [], color="#d62728", lw=1.4, marker="o", ms=3, label="seeds shown")
            ax.plot([], [], color=machine_color(machine), alpha=0.3, lw=0.8, label="other seeds")
            ax.set_xticks(ks)
            ax.set_xlabel("inconsistent 4-neighbours of the pixel\n(from another training image)", fontsize=9)
            ax.set_ylabel(f"mean |network - {name}|", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.tick_params(labelsize=7)
            ax.legend(loc="lower right", fontsize=7)
            ax.set_title("departure against the mosaic's boundaries", fontsize=10)
    return fig


def save_departure_figure(path: str | Path, *args, dpi: float = 120, **kwargs) -> Path:
    """Write `departure_figure(*args, **kwargs)` at `path` (PNG, SVG or PDF by the extension), atomically;
    refuses a file elsfast did not write."""
    check_figure_path(path)
    return save_figure(departure_figure(*args, **kwargs), path, dpi=dpi)


def save_worst_seeds_figure(path: str | Path, *args, dpi: float = 120, **kwargs) -> Path:
    """Write `worst_seeds_figure(*args, **kwargs)` at `path` (PNG, SVG or PDF by the extension), atomically;
    refuses a file elsfast did not write."""
    check_figure_path(path)
    return save_figure(worst_seeds_figure(*args, **kwargs), path, dpi=dpi)
