"""One picture per sample that shows how a machine built it out of training patches (paper Theorem 4.1).

`explain_figure` composes, with Pillow only, for one sample and its `Provenance`:

    (a) the sample;
    (b) the source map: every pixel in the colour of the training image it came from (a fixed categorical palette
        given to the source images in order of how many pixels they provide) and a legend of the largest sources;
    (c) the offset map: how far each patch moved (source location minus pixel location), direction as hue and
        distance as brightness, with a colour wheel (black: not moved);
    (d) the posterior entropy of every pixel at up to 6 evenly spaced sampling steps, the last one being the final
        step, on one colour scale from 0 to the largest entropy shown;
    (e) the `top` training images that provide the most pixels, each with the region it provides (the source
        pixels `(source_y, source_x)` of its pixels) outlined in its palette colour and the rest washed out.

`explain` samples with a machine, writes one such figure per sample and the creativity measures
(`elsfast.research.creativity.measure`) as `measures.json`.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .. import sampling
from ..common.checks import labels_per_sample
from ..common.fileio import atomic_write, check_replaceable
from ..common.imageio import to_uint8
from ..common.provenance import Provenance
from ..common.scales import PatchSizeSpec
from ..machine import ScoreMachine
from . import creativity

__all__ = ["PALETTE", "default_scale", "explain", "explain_figure", "palette_colour", "save_explain_figure"]

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

_VIRIDIS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MUTED = (90, 90, 90)
WASH = 140  # pixels outside a source's region are pulled towards this grey, halving their contrast
MARGIN, GAP, ENTROPY_MAPS = 8, 10, 6


def palette_colour(rank: int) -> tuple[int, int, int]:
    """Colour of the source of rank `rank` (0: provides the most pixels): `PALETTE` for the first 20, then muted
    colours whose hues step by the golden ratio (distinct from each other, but paler than the palette)."""
    if rank < len(PALETTE):
        return PALETTE[rank]
    r, g, b = colorsys.hsv_to_rgb((rank * 0.6180339887) % 1.0, 0.45, 0.75)
    return round(r * 255), round(g * 255), round(b * 255)


# ------------------------------------------------------------------------------------------------ layout


@dataclass
class _Block:
    """A piece of the figure and the named boxes (x0, y0, x1, y1) of its panels, relative to its corner."""

    image: Image.Image
    boxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


_FONT = None


def _text(text: str, colour=INK) -> _Block:
    global _FONT
    if _FONT is None:
        _FONT = _font()
    lines = text.split("\n")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), line or " ", font=_FONT) for line in lines]
    line_h = probe.textbbox((0, 0), "Ag#%(|", font=_FONT)[3] + 3
    width = max(b[2] for b in boxes) + 1
    image = Image.new("RGB", (width, line_h * len(lines)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for k, line in enumerate(lines):
        draw.text((0, k * line_h), line, fill=colour, font=_FONT)
    return _Block(image)


def _picture(array: np.ndarray, name: str | None = None, scale: int = 1) -> _Block:
    """uint8 `[H, W, 3]` upscaled `scale` times by nearest neighbour; `name` records its box."""
    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    return _Block(image, {name: (0, 0, *image.size)} if name else {})


def _stack(blocks: Sequence[_Block | None], *, horizontal: bool, gap: int = GAP) -> _Block:
    """Blocks side by side (top-aligned) or one above the other (left-aligned); None entries are skipped."""
    blocks = [b for b in blocks if b is not None]
    if not blocks:
        return _Block(Image.new("RGB", (1, 1), BACKGROUND))
    along = [b.size[0 if horizontal else 1] for b in blocks]
    across = max(b.size[1 if horizontal else 0] for b in blocks)
    length = sum(along) + gap * (len(blocks) - 1)
    image = Image.new("RGB", (length, across) if horizontal else (across, length), BACKGROUND)
    boxes, pos = {}, 0
    for block, size in zip(blocks, along, strict=True):
        corner = (pos, 0) if horizontal else (0, pos)
        image.paste(block.image, corner)
        for name, (x0, y0, x1, y1) in block.boxes.items():
            boxes[name] = (x0 + corner[0], y0 + corner[1], x1 + corner[0], y1 + corner[1])
        pos += size + gap
    return _Block(image, boxes)


def _cell(title: str, body: _Block, *below: _Block | None) -> _Block:
    return _stack([_text(title), body, *below], horizontal=False, gap=3)


def _pad(block: _Block, margin: int) -> _Block:
    w, h = block.size
    image = Image.new("RGB", (w + 2 * margin, h + 2 * margin), BACKGROUND)
    image.paste(block.image, (margin, margin))
    boxes = {k: (x0 + margin, y0 + margin, x1 + margin, y1 + margin) for k, (x0, y0, x1, y1) in block.boxes.items()}
    return _Block(image, boxes)


# ------------------------------------------------------------------------------------------------ colours


def _rgb(images: torch.Tensor) -> np.ndarray:
    """`[N, C, H, W]` float in [-1, 1] or uint8, C = 1 or 3 -> uint8 `[N, H, W, 3]` (grey repeated)."""
    u = to_uint8(images.detach().cpu())
    return u.repeat(3, axis=3) if u.shape[3] == 1 else u


def _hsv(h: np.ndarray, s: np.ndarray | float, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) -> uint8 RGB `[..., 3]`."""
    h = (h % 1.0) * 6.0
    s = np.broadcast_to(s, h.shape)
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((*h.shape, 3))
    for k, channels in enumerate(choices):
        rgb[i == k] = np.stack(channels, axis=-1)[i == k]
    return np.round(rgb * 255).astype(np.uint8)


def _viridis(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB `[..., 3]` on an approximation of the viridis colour map."""
    x = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(_VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    return np.round(_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).astype(np.uint8)


def _offset_colours(dy: np.ndarray, dx: np.ndarray) -> tuple[np.ndarray, float]:
    """Offsets -> RGB: hue from the direction, brightness from the distance (0: black; the largest: full)."""
    distance = np.hypot(dy, dx)
    largest = float(distance.max()) if distance.size else 0.0
    hue = (np.arctan2(dy, dx) / (2 * math.pi)) % 1.0
    value = np.where(distance > 0, 0.25 + 0.75 * distance / max(largest, 1e-12), 0.0)
    return _hsv(hue, 1.0, value), largest


def _wheel(radius: int = 13) -> np.ndarray:
    """The key of the offset map: a disc whose pixel at (dy, dx) from the centre has that offset's colour."""
    d = np.arange(-radius, radius + 1, dtype=np.float64)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    rgb, _ = _offset_colours(dy, dx)
    rgb[np.hypot(dy, dx) > radius + 0.5] = BACKGROUND
    return rgb


def _swatch(colour, size: int = 10) -> _Block:
    array = np.full((size, size, 3), colour, dtype=np.uint8)
    array[[0, -1], :] = array[:, [0, -1]] = 60
    return _picture(array)


def _boundary(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Pixels of `mask` within `thickness` (4-neighbour steps) of its outside; the image border counts as outside."""
    inner = mask.copy()
    for _ in range(thickness):
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


# ------------------------------------------------------------------------------------------------ the figure


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


def _source_order(source_image: np.ndarray) -> list[tuple[int, int]]:
    """(training index, pixels) of every source image, most pixels first (ties: smaller index first)."""
    ids, counts = np.unique(source_image, return_counts=True)
    return sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda p: (-p[1], p[0]))


def _entropy_row(
    entropy_over_time: torch.Tensor | None, times: Sequence[float] | None, final: np.ndarray, H: int, W: int, scale: int
) -> _Block:
    if entropy_over_time is None:
        maps, titles = final[None], ["final"]
    else:
        maps = entropy_over_time.detach().cpu().double().numpy()
        if maps.ndim != 3 or maps.shape[1:] != (H, W) or maps.shape[0] == 0:
            raise ValueError(f"entropy_over_time must have shape [K, {H}, {W}], got {list(maps.shape)}")
        K = maps.shape[0]
        if times is not None and len(times) != K:
            raise ValueError(f"times must have one entry per step of entropy_over_time ({K}), got {len(times)}")
        shown = min(K, ENTROPY_MAPS)
        steps = sorted({round(j * (K - 1) / (shown - 1)) for j in range(shown)} if shown > 1 else {K - 1})
        maps = maps[steps]
        titles = [f"t={times[i]:.2f}" if times is not None else f"step {i + 1}/{K}" for i in steps]
        titles[-1] += " (final)"
    top = float(np.nanmax(maps)) if np.isfinite(maps).any() else 0.0
    top = top if top > 0 else 1.0
    cells = [
        _cell(title, _picture(_viridis(m / top), f"entropy_{j}", scale))
        for j, (title, m) in enumerate(zip(titles, maps, strict=True))
    ]
    bar = _picture(_viridis(np.linspace(0.0, 1.0, 96))[None].repeat(10, axis=0), "entropy_bar")
    key = _stack([_text("0"), bar, _text(f"{top:.2f} nats")], horizontal=True, gap=4)
    header = _text(
        f"(d) posterior entropy per pixel during sampling (0 = one source; colour scale 0 to {top:.2f} nats)"
    )
    return _stack([header, _stack(cells, horizontal=True), key], horizontal=False, gap=4)


def explain_figure(
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
) -> Image.Image:
    """A figure (RGB PIL image) explaining one sample `[C, H, W]` (float in [-1, 1]) as a mosaic of training patches.

    Args:
        provenance: the `Provenance` of this one sample (tensors `[H, W]`: index a batch's with `prov[k]`).
        train_images: the machine's training set `[N, C, H, W]` (float in [-1, 1] or uint8); indexed by
            `provenance.source_image`.
        entropy_over_time: `[K, H, W]` posterior entropy at each sampling step, in sampling order
            (`SampleTrace.entropy[:, k]`); without it panel (d) shows `provenance.entropy` alone.
        times: t of each of the K steps (`SampleTrace.times`), used as the titles of the entropy maps.
        top: how many of the largest sources get a legend entry in (b) and a panel in (e).
        scale: nearest-neighbour upscaling of the image panels (the entropy maps get half of it).
        title: an optional first line.
        wrap: show offsets modulo the image size, in [-H/2, H/2) x [-W/2, W/2): the shortest way round for a
            machine with circular padding (an ES shift is then one colour); `explain` sets it for such machines.

    The panels are laid out as: a title line; (a) sample, (b) source map with its legend and (c) offset map with
    its colour wheel side by side; the row (d) of entropy maps with their colour bar; the row (e) of top sources.
    `figure.info["panels"]` maps each panel ("sample", "source", "offset", "entropy_<j>", "top_<j>") to its
    picture's box (x0, y0, x1, y1) in the figure, and `figure.info["sources"]` lists (training index, pixels) of
    every source image, most pixels first: the source of rank r has colour `palette_colour(r)`.
    """
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
    order = _source_order(prov["source_image"])
    pixels = H * W

    # (a) the sample
    sample_cell = _cell("(a) sample", _picture(_rgb(sample[None])[0], "sample", scale))

    # (b) the source map and its legend
    lut_ids = np.array([index for index, _ in order])
    lut = np.array([palette_colour(r) for r in range(len(order))], dtype=np.uint8)
    sorter = np.argsort(lut_ids)
    source_rgb = lut[sorter[np.searchsorted(lut_ids, prov["source_image"], sorter=sorter)]]
    legend = [
        _stack([_swatch(palette_colour(r)), _text(f"#{index}  {count / pixels:.1%}")], horizontal=True, gap=4)
        for r, (index, count) in enumerate(order[:top])
    ]
    more = len(order) - len(legend)
    legend.append(_text(f"{len(order)} source image{'s' if len(order) != 1 else ''}" + (f", {more} more" * (more > 0))))
    source_cell = _cell("(b) source image", _picture(source_rgb, "source", scale), *legend)

    # (c) the offset map and its key
    ys, xs = np.arange(H)[:, None], np.arange(W)[None, :]
    dy, dx = prov["source_y"] - ys, prov["source_x"] - xs
    if wrap:
        dy, dx = (dy + H // 2) % H - H // 2, (dx + W // 2) % W - W // 2
    offset_rgb, largest = _offset_colours(dy.astype(np.float64), dx.astype(np.float64))
    if largest == 0:
        note = _text("no offsets (IS/LS)")
    else:
        note = _stack(
            [_picture(_wheel()), _text(f"hue: direction\nbright: distance\nmax {largest:.1f} px", MUTED)],
            horizontal=True,
            gap=4,
        )
    offset_cell = _cell("(c) patch offset", _picture(offset_rgb, "offset", scale), note)

    # (d) the entropy maps
    entropy_row = _entropy_row(entropy_over_time, times, prov["entropy"], H, W, max(1, (scale + 1) // 2))

    # (e) the top sources, each with its region outlined
    tops = []
    thickness = max(1, scale // 4)
    for r, (index, count) in enumerate(order[:top]):
        if not 0 <= index < train_images.shape[0]:
            raise ValueError(f"provenance names training image {index}, but there are {train_images.shape[0]}")
        picture = _rgb(train_images[index : index + 1])[0].repeat(scale, axis=0).repeat(scale, axis=1)
        mask = np.zeros((H, W), dtype=bool)
        mine = prov["source_image"] == index
        mask[prov["source_y"][mine] % H, prov["source_x"][mine] % W] = True
        mask = mask.repeat(scale, axis=0).repeat(scale, axis=1)
        washed = (picture * 0.45 + WASH * 0.55).round().astype(np.uint8)
        picture = np.where(mask[..., None], picture, washed)
        picture[_boundary(mask, thickness)] = palette_colour(r)
        tops.append(_cell(f"#{index}  {count / pixels:.1%} ({count} px)", _picture(picture, f"top_{r}")))
    header = _text(f"(e) the {len(tops)} largest source image{'s' if len(tops) != 1 else ''}, region used outlined")
    top_row = _stack([header, _stack(tops, horizontal=True)], horizontal=False, gap=4)

    figure = _stack(
        [
            _text(title) if title else None,
            _stack([sample_cell, source_cell, offset_cell], horizontal=True, gap=2 * GAP),
            entropy_row,
            top_row,
        ],
        horizontal=False,
        gap=GAP + 2,
    )
    figure = _pad(figure, MARGIN)
    figure.image.info["panels"] = figure.boxes
    figure.image.info["sources"] = order
    return figure.image


def save_explain_figure(path: str | Path, *args, **kwargs) -> Path:
    """Write `explain_figure(*args, **kwargs)` as a PNG at `path` (must end in .png), atomically; returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the figure is written as PNG: the path must end in .png, got {str(path)!r}")
    figure = explain_figure(*args, **kwargs)
    return atomic_write(path, lambda f: figure.save(f, format="PNG"))


# ------------------------------------------------------------------------------------------------ explain


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
) -> list[dict]:
    """Sample `n` images with `machine` (as `elsfast.sample`, with provenance) and explain each one.

    Writes `out_dir/sample_{k}.png` (`explain_figure`) for every sample and then `out_dir/measures.json`: the
    `creativity.measure` dict of every sample (consistency checked at the last step's patch size) with the
    sample index, seed, label, figure file and the machine and sampling settings added. Returns those dicts.
    `scale` defaults to `default_scale` of the images.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a directory")
    for name in [*(f"sample_{k}.png" for k in range(n)), "measures.json"]:
        check_replaceable(out_dir / name)  # before sampling: a foreign file there would be refused at the end
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
    out = []
    for k, m in enumerate(measures):
        label = None if sample_labels is None else int(sample_labels[k])
        figure = f"sample_{k}.png"
        title = (
            f"sample {k} (seed {seed}{'' if label is None else f', class {label}'}): {machine.machine.upper()} "
            f"machine, {machine.padding} padding, {size_text}, {steps} steps"
        )
        save_explain_figure(
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
    atomic_write(out_dir / "measures.json", lambda f: f.write(text))
    return out


def _sizes_text(sizes: Sequence[int]) -> str:
    distinct = sorted(set(sizes))
    if len(distinct) == 1:
        return f"P={distinct[0]}"
    return f"P={sizes[0]}..{sizes[-1]}"
