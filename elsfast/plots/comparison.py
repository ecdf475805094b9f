"""The figures of a network-vs-machines comparison (`elsfast.research.compare`).

`r_histogram_figure`: the distribution over seeds of the Pearson r between each machine's image and the
network's image, one outlined histogram per machine on shared bins, with each machine's median marked.
`r_scatter_figure`: per seed, a machine's r against IS's r; points above the diagonal are seeds on which the
machine beats IS. Non-finite r values (a constant image) are left out and counted in the legend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .style import check_figure_path, machine_color, machine_name, new_figure, save_figure, styled

__all__ = ["r_histogram_figure", "r_scatter_figure", "save_r_histogram", "save_r_scatter"]


def _finite(values: Sequence[float | None]) -> np.ndarray:
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def _lower_limit(values: np.ndarray) -> float:
    """0, or below it in steps of 0.1 when some r is negative (never below -1)."""
    return max(-1.0, min(0.0, math.floor(float(values.min()) * 10) / 10)) if values.size else 0.0


def r_histogram_figure(r: Mapping[str, Sequence[float | None]], *, title: str | None = None):
    """A matplotlib `Figure`: histograms of Pearson r per machine (`r`: machine name -> one r per seed)."""
    if not r:
        raise ValueError("no machines to draw")
    finite = {m: _finite(v) for m, v in r.items()}
    seeds = max(len(v) for v in r.values())
    lo = _lower_limit(np.concatenate(list(finite.values())))
    edges = np.linspace(lo, 1.0, 21)
    with styled():
        fig = new_figure(7.2, 4.2)
        ax = fig.subplots()
        for k, (m, values) in enumerate(finite.items()):
            colour = machine_color(m, k)
            dropped = len(r[m]) - values.size
            median = float(np.median(values)) if values.size else math.nan
            label = f"{machine_name(m)}: median {median:.3f}" + (f" ({dropped} not finite)" if dropped else "")
            clipped = np.clip(values, lo, 1.0)
            ax.hist(clipped, bins=edges, color=colour, alpha=0.25, lw=0)
            ax.hist(clipped, bins=edges, histtype="step", color=colour, lw=1.8, label=label)
            if values.size:
                ax.axvline(median, color=colour, ls="--", lw=1.2)
        ax.set_xlim(lo, 1.0)
        ax.set_xlabel("Pearson r of the machine image with the network image")
        ax.set_ylabel("seeds")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend(loc="upper left", title="dashed: median")
        ax.set_title(title or f"Agreement with the network, {seeds} seed{'s' * (seeds != 1)}")
    return fig


def r_scatter_figure(
    r_is: Sequence[float | None], r_machine: Sequence[float | None], machine: str = "els", *, title: str | None = None
):
    """A matplotlib `Figure`: per seed, `machine`'s Pearson r (y) against IS's (x), with the diagonal."""
    if len(r_is) != len(r_machine):
        raise ValueError(f"one r per seed for both machines: {len(r_is)} and {len(r_machine)} values")
    x = np.array([np.nan if v is None else float(v) for v in r_is], dtype=np.float64)
    y = np.array([np.nan if v is None else float(v) for v in r_machine], dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    wins = int(np.sum(y[keep] > x[keep]))  # a NaN never wins
    name = machine_name(machine)
    lo = _lower_limit(np.concatenate([x[keep], y[keep]]))
    with styled():
        fig = new_figure(5.4, 5.4)
        ax = fig.subplots()
        ax.plot([lo, 1.0], [lo, 1.0], color="#9e9e9e", lw=1, ls="--", label="equal r", zorder=1)
        label = f"one seed ({name} higher on {wins} of {len(x)})"
        if (~keep).any():
            label += f"; {int((~keep).sum())} not finite, not shown"
        ax.scatter(
            x[keep],
            y[keep],
            s=22,
            color=machine_color(machine),
            alpha=0.8,
            edgecolor="white",
            lw=0.5,
            label=label,
            zorder=2,
        )
        ax.set_xlim(lo - 0.02, 1.02)  # a margin: r = 1 is a possible value and stays visible
        ax.set_ylim(lo - 0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("IS: Pearson r with the network image")
        ax.set_ylabel(f"{name}: Pearson r with the network image")
        ax.legend(loc="lower right")
        ax.set_title(title or f"Per seed: {name} vs IS")
    return fig


def save_r_histogram(path: str | Path, *args, dpi: float = 120, **kwargs) -> Path:
    """Write `r_histogram_figure(*args, **kwargs)` at `path` (PNG/SVG/PDF by the extension), atomically."""
    check_figure_path(path)
    return save_figure(r_histogram_figure(*args, **kwargs), path, dpi=dpi)


def save_r_scatter(path: str | Path, *args, dpi: float = 120, **kwargs) -> Path:
    """Write `r_scatter_figure(*args, **kwargs)` at `path` (PNG/SVG/PDF by the extension), atomically."""
    check_figure_path(path)
    return save_figure(r_scatter_figure(*args, **kwargs), path, dpi=dpi)
