"""The calibration figure: how well each candidate patch size matches the network over t, and the chosen P(t).

Top panel: the median over seeds of the cosine similarity between each candidate machine's eps and the network's
eps, one line per patch size P, at every calibrated step t (with the interquartile range of the seeds shaded),
drawn as 1 - cosine on a log scale so that the small differences near t = 1, where every candidate is close to
the network, stay visible (lower is closer).
Bottom panel: the P each seed chose at each step (a disc whose area grows with the number of seeds) and the
calibrated P(t), the lower median over seeds. The inputs are the arrays of a
`elsfast.research.calibrate.CalibrationResult` (whose `plot` method calls `save_calibration_figure`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .style import MACHINE_COLORS, check_figure_path, new_figure, save_figure, styled

__all__ = ["calibration_figure", "save_calibration_figure"]


def _array(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def calibration_figure(
    sizes: Sequence[int],
    cosine,
    best,
    scales: Sequence[int],
    *,
    title: str | None = None,
):
    """A matplotlib `Figure` of a calibration.

    Args:
        sizes: the K candidate patch sizes, ascending.
        cosine: `[S, steps, K]` cosine similarity of candidate k's eps with the network's (step 0 is not used).
        best: `[S, steps]` each seed's chosen P per step (step 0 is not used).
        scales: the calibrated P(t), entry i for t = i / steps.
        title: the figure's title (default: seeds and steps).
    """
    cos, chosen = _array(cosine), _array(best)
    if cos.ndim != 3 or chosen.shape != cos.shape[:2] or cos.shape[2] != len(sizes):
        raise ValueError(
            f"cosine must be [S, steps, {len(sizes)}] and best [S, steps], got {cos.shape} and {chosen.shape}"
        )
    seeds, steps = chosen.shape
    if len(scales) != steps:
        raise ValueError(f"scales must have one entry per step ({steps}), got {len(scales)}")
    t = np.arange(1, steps) / steps
    with styled():
        from matplotlib import colormaps

        fig = new_figure(7.2, 6.4)
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1.15, 1.0))
        colours = colormaps["viridis"](np.linspace(0.0, 0.9, len(sizes)))
        # quantiles of 1 - cos: its 75% quantile is cos's 25% one; floored so that the log scale can show it
        distance = np.clip(1.0 - cos[:, 1:], 1e-6, None)
        quartiles = np.nanquantile(distance, [0.25, 0.5, 0.75], axis=0)
        for k, (p, colour) in enumerate(zip(sizes, colours, strict=True)):
            lo, med, hi = quartiles[:, :, k]
            top.plot(t, med, color=colour, lw=1.8, marker="o", ms=3, label=f"P = {p}")
            if seeds > 1:
                top.fill_between(t, lo, hi, color=colour, alpha=0.15, lw=0)
        top.set_yscale("log")
        top.set_ylabel("1 - cosine similarity with the\nnetwork's eps (log; lower = closer)")
        top.set_title("how well each patch size matches the network (median over seeds, IQR shaded)", loc="left")
        top.legend(title="candidate", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)

        for i in range(1, steps):
            values, counts = np.unique(chosen[:, i], return_counts=True)
            bottom.scatter(
                np.full(len(values), i / steps),
                values,
                s=25 + 175 * counts / max(seeds, 1),
                color="#bdbdbd",
                edgecolor="#808080",
                lw=0.6,
                zorder=2,
                label="seeds choosing P (area ~ count)" if i == 1 else None,
            )
        bottom.plot(
            t, list(scales)[1:], color=MACHINE_COLORS["els"], lw=2.2, marker="o", ms=4, zorder=3, label="P(t): median"
        )
        bottom.set_yticks(list(sizes))
        bottom.set_ylim(min(sizes) - 1, max(sizes) + 1)
        bottom.set_ylabel("patch size P (pixels)")
        bottom.set_xlabel("t (noise level; the sampler runs from t = 1 down to 0)")
        bottom.set_xlim(0.0, 1.0)
        bottom.set_title("chosen patch size per step", loc="left")
        bottom.legend(loc="upper left")
        fig.suptitle(title or f"Calibrated patch size P(t): {seeds} seed{'s' * (seeds != 1)}, {steps} steps")
    return fig


def save_calibration_figure(path: str | Path, *args, dpi: float = 120, **kwargs) -> Path:
    """Write `calibration_figure(*args, **kwargs)` at `path` (PNG, SVG or PDF by the extension), atomically;
    refuses a file elsfast did not write. Returns the path."""
    check_figure_path(path)
    return save_figure(calibration_figure(*args, **kwargs), path, dpi=dpi)
