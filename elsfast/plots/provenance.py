"""The provenance figure of `elsfast explain`: how a machine built one sample out of training patches (paper
Theorem 4.1).

`provenance_panels` computes what is shown (numpy arrays, checked by the tests); `provenance_figure` draws it:

    (a) the sample;
    (b) the source map: every pixel in the colour of the training image it came from (`PALETTE`, given to the
        source images in order of how many pixels they provide) with a legend of the largest sources;
    (c) the offset map: how far each patch moved (source location minus pixel location), direction as hue and
        distance as brightness, and its key, a colour wheel with axes in pixels (black: not moved);
    (d) the posterior entropy of every pixel at up to 6 evenly spaced sampling steps (the last one the final
        step) on one colour scale with a colour bar in nats, and the mean entropy per pixel over t;
    (e) the `top` training images that provide the most pixels, each with the region it provides (the source
        pixels `(source_y, source_x)` of its pixels) outlined in its palette colour and the rest washed out.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..common.imageio import to_uint8
from ..common.provenance import Provenance
from .style import check_figure_path, new_figure, require_matplotlib, save_figure, styled

__all__ = [
    "ENTROPY_MAPS",
    "PALETTE",
    "ProvenancePanels",
    "offset_colours",
    "palette_colour",
    "provenance_figure",
    "provenance_panels",
    "save_provenance_figure",
    "source_colours",
]

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (255, 225, 25),  # yellow
    (210, 245, 60),  # lime
    (0, 128, 128),  # teal
    (170, 110, 40),  # brown
    (250, 190, 212),  # pink
    (128, 0, 0),  # maroon
    (170, 255, 195),  # mint
    (128, 128, 0),  # olive
    (0, 0, 128),  # navy
    (220, 190, 255),  # lavender
    (255, 215, 180),  # apricot
    (255, 250, 200),  # beige
    (128, 128, 128),  # grey
)
"""Colours of the 20 largest sources, largest first (Trubetskoy's 20 distinct colours, black and white left out)."""

ENTROPY_MAPS = 6
"""At most this many entropy maps are shown (evenly spaced steps, the final step last)."""

WASH = 140  # pixels outside a source's region are pulled towards this grey, halving their contrast


def palette_colour(rank: int) -> tuple[int, int, int]:
    """Colour of the source of rank `rank` (0: provides the most pixels): `PALETTE` for the first 20, then muted
    colours whose hues step by the golden ratio (distinct from each other, but paler than the palette)."""
    if rank < len(PALETTE):
        return PALETTE[rank]
    r, g, b = colorsys.hsv_to_rgb((rank * 0.6180339887) % 1.0, 0.45, 0.75)
    return round(r * 255), round(g * 255), round(b * 255)


def offset_colours(dy: np.ndarray, dx: np.ndarray, largest: float | None = None) -> np.ndarray:
    """Offsets -> uint8 RGB `[..., 3]`: hue from the direction (0 = to the right: red), brightness from the
    distance (0: black; `largest`, default the largest given: full brightness)."""
    require_matplotlib()
    from matplotlib.colors import hsv_to_rgb

    dy, dx = np.asarray(dy, dtype=np.float64), np.asarray(dx, dtype=np.float64)
    distance = np.hypot(dy, dx)
    if largest is None:
        largest = float(distance.max()) if distance.size else 0.0
    hue = (np.arctan2(dy, dx) / (2 * math.pi)) % 1.0
    value = np.where(distance > 0, 0.25 + 0.75 * np.minimum(distance / max(largest, 1e-12), 1.0), 0.0)
    hsv = np.stack([hue, np.ones_like(hue), value], axis=-1)
    return np.round(hsv_to_rgb(hsv) * 255).astype(np.uint8)


def source_colours(source_image: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The source map of one sample: `source_image` `[H, W]` (training index of every pixel) -> (uint8 RGB
    `[H, W, 3]`, every pixel in its source's `palette_colour`; the sources as (training index, pixels), most
    pixels first (ties: lower index first), rank r coloured `palette_colour(r)`)."""
    source_image = np.asarray(source_image, dtype=np.int64)
    ids, counts = np.unique(source_image, return_counts=True)
    order = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
    lut_ids = np.array([index for index, _ in order], dtype=np.int64)
    lut = np.array([palette_colour(r) for r in range(len(order))], dtype=np.uint8).reshape(-1, 3)
    sorter = np.argsort(lut_ids)
    return lut[sorter[np.searchsorted(lut_ids, source_image, sorter=sorter)]], order


@dataclass
class ProvenancePanels:
    """What the provenance figure shows, as arrays (uint8 RGB pictures `[h, w, 3]` at the image's resolution
    unless said otherwise).

    - `sample`, `source` (the source map), `offset` (the offset map), `largest_offset` (pixels);
    - `sources`: (training index, pixels) of every source image, most pixels first: rank r has `palette_colour(r)`;
    - `entropy`: float `[k, H, W]` maps in nats (k <= `ENTROPY_MAPS`), `entropy_titles` one per map,
      `entropy_max` the top of their shared colour scale;
    - `entropy_curve`: (t or step number, mean entropy per pixel) over every step, or None without a trace;
    - `tops`: (training index, pixels, picture) of the largest sources, the picture upscaled `scale` times with
      its region outlined.
    """

    sample: np.ndarray
    source: np.ndarray
    sources: list[tuple[int, int]]
    offset: np.ndarray
    largest_offset: float
    entropy: np.ndarray
    entropy_titles: list[str]
    entropy_max: float
    entropy_curve: tuple[np.ndarray, np.ndarray, str] | None
    tops: list[tuple[int, int, np.ndarray]]
    wrap: bool = False


def _rgb(images: torch.Tensor) -> np.ndarray:
    """`[N, C, H, W]` float in [-1, 1] or uint8, C = 1 or 3 -> uint8 `[N, H, W, 3]` (grey repeated)."""
    u = to_uint8(images.detach().cpu())
    return u.repeat(3, axis=3) if u.shape[3] == 1 else u


def _boundary(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Pixels of `mask` within `thickness` (4-neighbour steps) of its outside; the image border counts as outside."""
    inner = mask.copy()
    for _ in range(thickness):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _one(provenance: Provenance, H: int, W: int) -> dict[str, np.ndarray]:
    fields = {}
    for name in ("source_image", "source_y", "source_x", "entropy"):
        value = getattr(provenance, name).detach().cpu()
        if value.dim() == 3 and value.shape[0] == 1:
            value = value[0]
        if tuple(value.shape) != (H, W):
            raise ValueError(
                f"provenance.{name} must have shape [H, W] = [{H}, {W}] (one sample: index the batch "
                f"provenance with prov[k]), got {list(value.shape)}"
            )
        fields[name] = value.double().numpy() if name == "entropy" else value.long().numpy()
    return fields


def _entropy(entropy_over_time, times, final: np.ndarray, H: int, W: int):
    if entropy_over_time is None:
        maps, titles, curve = final[None], ["final"], None
    else:
        all_maps = entropy_over_time.detach().cpu().double().numpy()
        if all_maps.ndim != 3 or all_maps.shape[1:] != (H, W) or all_maps.shape[0] == 0:
            raise ValueError(f"entropy_over_time must have shape [K, {H}, {W}], got {list(all_maps.shape)}")
        K = all_maps.shape[0]
        if times is not None and len(times) != K:
            raise ValueError(f"times must have one entry per step of entropy_over_time ({K}), got {len(times)}")
        shown = min(K, ENTROPY_MAPS)
        steps = sorted({round(j * (K - 1) / (shown - 1)) for j in range(shown)} if shown > 1 else {K - 1})
        maps = all_maps[steps]
        titles = [f"t = {times[i]:.2f}" if times is not None else f"step {i + 1}/{K}" for i in steps]
        titles[-1] += " (final)"
        xs = np.asarray(times, dtype=np.float64) if times is not None else np.arange(1, K + 1, dtype=np.float64)
        curve = (xs, np.nanmean(all_maps.reshape(K, -1), axis=1), "t" if times is not None else "step")
    top = float(np.nanmax(maps)) if np.isfinite(maps).any() else 0.0
    return maps, titles, top if top > 0 else 1.0, curve


def provenance_panels(
    sample: torch.Tensor,
    provenance: Provenance,
    train_images: torch.Tensor,
    *,
    entropy_over_time: torch.Tensor | None = None,
    times: Sequence[float] | None = None,
    top: int = 4,
    scale: int = 4,
    wrap: bool = False,
) -> ProvenancePanels:
    """The arrays of the provenance figure of one sample `[C, H, W]` (see `provenance_figure` for the arguments)."""
    require_matplotlib()
    if isinstance(top, bool) or int(top) != top or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    top, scale = int(top), int(scale)
    if not isinstance(sample, torch.Tensor) or sample.dim() != 3 or sample.shape[0] not in (1, 3):
        raise ValueError(f"sample must be a tensor [C, H, W] with C = 1 or 3, got {getattr(sample, 'shape', sample)}")
    C, H, W = sample.shape
    if train_images.dim() != 4 or tuple(train_images.shape[1:]) != (C, H, W):
        raise ValueError(
            f"train_images must have shape [N, {C}, {H}, {W}] like the sample, got {list(train_images.shape)}"
        )
    prov = _one(provenance, H, W)
    source, order = source_colours(prov["source_image"])
    for index, _ in order[:top]:
        if not 0 <= index < train_images.shape[0]:
            raise ValueError(f"provenance names training image {index}, but there are {train_images.shape[0]}")

    ys, xs = np.arange(H)[:, None], np.arange(W)[None, :]
    dy, dx = prov["source_y"] - ys, prov["source_x"] - xs
    if wrap:
        dy, dx = (dy + H // 2) % H - H // 2, (dx + W // 2) % W - W // 2
    largest = float(np.hypot(dy, dx).max())
    offset = offset_colours(dy, dx, largest)

    maps, titles, entropy_max, curve = _entropy(entropy_over_time, times, prov["entropy"], H, W)

    tops = []
    thickness = max(1, scale // 4)
    for r, (index, count) in enumerate(order[:top]):
        picture = _rgb(train_images[index : index + 1])[0].repeat(scale, axis=0).repeat(scale, axis=1)
        mask = np.zeros((H, W), dtype=bool)
        mine = prov["source_image"] == index
        mask[prov["source_y"][mine] % H, prov["source_x"][mine] % W] = True
        mask = mask.repeat(scale, axis=0).repeat(scale, axis=1)
        washed = (picture * 0.45 + WASH * 0.55).round().astype(np.uint8)
        picture = np.where(mask[..., None], picture, washed)
        picture[_boundary(mask, thickness)] = palette_colour(r)
        tops.append((index, count, picture))
    return ProvenancePanels(
        sample=_rgb(sample[None])[0],
        source=source,
        sources=order,
        offset=offset,
        largest_offset=largest,
        entropy=maps,
        entropy_titles=titles,
        entropy_max=entropy_max,
        entropy_curve=curve,
        tops=tops,
        wrap=wrap,
    )


def _picture(ax, picture: np.ndarray, title: str, **kwargs):
    image = ax.imshow(picture, interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("#b0b0b0")
    return image


def _wheel(ax, largest: float, wrap: bool) -> None:
    if largest == 0:
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "no offsets:\nevery patch is\nat its own place",
            ha="center",
            va="center",
            fontsize=9,
            transform=ax.transAxes,
        )
        return
    n = 101
    d = np.linspace(-largest, largest, n)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    rgba = np.ones((n, n, 4))
    rgba[..., :3] = offset_colours(dy, dx, largest) / 255.0
    rgba[np.hypot(dy, dx) > largest, 3] = 0.0
    ax.imshow(rgba, extent=(-largest, largest, largest, -largest), interpolation="bilinear")
    ax.set_title("offset key" + (" (wrapped)" if wrap else ""), fontsize=9)
    ax.set_xlabel("dx (px)", fontsize=8, labelpad=1)
    ax.set_ylabel("dy (px, down)", fontsize=8, labelpad=1)
    ax.tick_params(labelsize=7)
    ax.grid(False)


def provenance_figure(
    sample: torch.Tensor,
    provenance: Provenance,
    train_images: torch.Tensor,
    *,
    entropy_over_time: torch.Tensor | None = None,
    times: Sequence[float] | None = None,
    top: int = 4,
    scale: int = 4,
    title: str | None = None,
    wrap: bool = False,
):
    """A matplotlib `Figure` explaining one sample `[C, H, W]` (float in [-1, 1]) as a mosaic of training patches.

    Args:
        provenance: the `Provenance` of this one sample (tensors `[H, W]`: index a batch's with `prov[k]`).
        train_images: the machine's training set `[N, C, H, W]` (float in [-1, 1] or uint8); indexed by
            `provenance.source_image`.
        entropy_over_time: `[K, H, W]` posterior entropy at each sampling step, in sampling order
            (`SampleTrace.entropy[:, k]`); without it panel (d) shows `provenance.entropy` alone.
        times: t of each of the K steps (`SampleTrace.times`), for the titles of the entropy maps and the curve.
        top: how many of the largest sources get a legend entry in (b) and a panel in (e).
        scale: upscaling of the pictures of (e), whose region outlines are `max(1, scale // 4)` pixels thick;
            `save_provenance_figure` also gives every image pixel at least `scale` pixels of a PNG.
        title: an optional title.
        wrap: show offsets modulo the image size, in [-H/2, H/2) x [-W/2, W/2): the shortest way round for a
            machine with circular padding (an ES shift is then one colour); `explain` sets it for such machines.
    """
    panels = provenance_panels(
        sample,
        provenance,
        train_images,
        entropy_over_time=entropy_over_time,
        times=times,
        top=top,
        scale=scale,
        wrap=wrap,
    )
    pixels = panels.sample.shape[0] * panels.sample.shape[1]
    n_maps = len(panels.entropy)
    curve = panels.entropy_curve is not None and len(panels.entropy_curve[0]) > 1
    columns = max(4, n_maps + (2 if curve else 1), len(panels.tops))
    with styled():
        from matplotlib.patches import Patch

        fig = new_figure(1.5 * columns, 7.4)
        rows = fig.subfigures(3, 1, height_ratios=(1.4, 1.0, 1.0))

        # (a)-(c)
        axes = rows[0].subplots(1, 4, width_ratios=(1, 1, 1, 0.8))
        _picture(axes[0], panels.sample, "(a) sample")
        _picture(axes[1], panels.source, "(b) source image of each pixel")
        legend = [
            Patch(facecolor=np.array(palette_colour(r)) / 255, edgecolor="#404040", label=f"#{i}: {c / pixels:.1%}")
            for r, (i, c) in enumerate(panels.sources[:top])
        ]
        more = len(panels.sources) - len(legend)
        if more > 0:
            legend.append(Patch(facecolor="none", edgecolor="none", label=f"+{more} more image{'s' * (more != 1)}"))
        axes[1].legend(
            handles=legend,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.02),
            fontsize=8,
            frameon=False,
            ncols=2,
            handlelength=1.0,
            columnspacing=0.8,
        )
        note = f"(c) patch offset, max {panels.largest_offset:.1f} px" if panels.largest_offset else "(c) patch offset"
        _picture(axes[2], panels.offset, note)
        _wheel(axes[3], panels.largest_offset, panels.wrap)
        sources = len(panels.sources)
        rows[0].suptitle(
            title or f"How the sample was assembled: {sources} source image{'s' * (sources != 1)}", fontsize=11
        )

        # (d)
        cells = n_maps + (1 if curve else 0)
        axes = np.atleast_1d(rows[1].subplots(1, max(cells, 1)))
        image = None
        for ax, m, t in zip(axes, panels.entropy, panels.entropy_titles, strict=False):
            image = _picture(ax, m, t, cmap="viridis", vmin=0.0, vmax=panels.entropy_max)
        bar = rows[1].colorbar(image, ax=list(axes[:n_maps]), shrink=0.85, pad=0.02, aspect=15)
        bar.set_label("entropy (nats)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        if curve:
            xs, mean, unit = panels.entropy_curve
            ax = axes[-1]
            ax.plot(xs, mean, color="#404040", lw=1.6, marker="o", ms=2.5)
            ax.set_xlabel(unit + (" (sampling runs 1 -> 0)" if unit == "t" else ""), fontsize=8)

            ax.tick_params(labelsize=7)
            ax.set_ylim(bottom=0)
            ax.margins(x=0.06)
            if unit == "t":
                ax.invert_xaxis()
            ax.set_title("mean over pixels (nats)", fontsize=9)
            ax.set_box_aspect(1)
        rows[1].suptitle(
            "(d) posterior entropy per pixel during sampling (0: one source explains the pixel)", fontsize=10
        )

        # (e)
        axes = np.atleast_1d(rows[2].subplots(1, columns))
        for ax, (index, count, picture) in zip(axes, panels.tops, strict=False):
            _picture(ax, picture, f"#{index}: {count / pixels:.1%} ({count} px)")
        for ax in axes[len(panels.tops) :]:
            ax.axis("off")
        shown = len(panels.tops)
        rows[2].suptitle(
            f"(e) the {shown} largest source image{'s' * (shown != 1)}, the region used outlined", fontsize=10
        )
    return fig


def save_provenance_figure(path: str | Path, *args, dpi: float | None = None, **kwargs) -> Path:
    """Write `provenance_figure(*args, **kwargs)` at `path` (PNG, SVG or PDF by the extension), atomically;
    refuses a file elsfast did not write. `dpi` defaults to enough for `scale` PNG pixels per image pixel."""
    check_figure_path(path)
    figure = provenance_figure(*args, **kwargs)
    if dpi is None:
        side = max(args[0].shape[-2:]) if args else max(kwargs["sample"].shape[-2:])
        dpi = min(300, max(110, math.ceil(side * int(kwargs.get("scale", 4)) / 1.45)))
    return save_figure(figure, path, dpi=dpi)
