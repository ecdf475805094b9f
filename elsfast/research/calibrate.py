"""Calibrating the patch size P(t) of a machine against a trained network (SPEC section 3, paper App. C).

The network runs its own reverse trajectory (the one DDIM sampler, `elsfast.ddim_sample`) from the initial noise
of each validation seed. At every step i (t = i / steps, i = steps - 1, ..., 1) the network's eps and the eps of
every candidate machine (one per patch size P) are evaluated on the *same* noisy image x_t, and the P whose eps has
the highest cosine similarity with the network's is that seed's best P at that step (ties go to the smallest P).
The calibrated P(t) is the median of the best P across seeds, step by step.

The network enters as a plain callable `eps_fn(x, abar, labels) -> eps` (`x` `[B, C, H, W]`, `abar` a float,
`labels` `[B]` int64 or None), so any model works, and so does an analytic machine posing as a network (which
is how the tests check that calibration recovers a known P). A `torch.nn.Module` with the signature of
`elsfast.nets.models` (`model(x, t, labels) -> eps`) is wrapped with `elsfast.nets.models.eps_at` automatically.

Layout of the result: `CalibrationResult.scales` is a list of length `steps` whose entry i is the patch size at
t = i / steps, exactly the layout of `elsfast.reference_scales()`, so `elsfast.sample(..., patch_size=result.scales)`
(with the same `steps`) uses it as is. The sampler never evaluates t = 0; entry 0 repeats entry 1 (the smallest
noise level that was calibrated), which is also what the published lists do in practice.

Initial noise: seed s gives `torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(s))` (float32, on the
CPU), the noise `elsfast.sample(n=1, seed=s)` draws for a float32 machine; seeds are batched together for speed,
which changes nothing since every network and machine treats the images of a batch independently.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..common.fileio import atomic_write, describe_file
from ..common.schedules import get_schedule
from ..machine import ScoreMachine
from ..sampling import ddim_sample
from .metrics import cosine_similarity

__all__ = [
    "DEFAULT_SIZES",
    "CalibrationResult",
    "EpsFn",
    "as_eps_fn",
    "calibrate",
    "network_denoiser",
    "seed_labels",
    "seed_noise",
]

EpsFn = Callable[[torch.Tensor, float, torch.Tensor | None], torch.Tensor]
"""eps_fn(x [B, C, H, W], abar, labels [B] | None) -> eps [B, C, H, W]: a network's noise prediction."""

DEFAULT_SIZES = (3, 5, 7, 9, 11, 13, 15, 17)
"""The candidate patch sizes of the paper's calibration."""

FORMAT = "elsfast-calibration/1"


# --------------------------------------------------------------------------------------------------------------
# helpers shared with elsfast.research.compare
# --------------------------------------------------------------------------------------------------------------


def as_eps_fn(network, schedule: str | Callable[[float], float] = "cosine-legacy") -> EpsFn:
    """`network` as an `eps_fn(x, abar, labels)`: a `torch.nn.Module` with the `elsfast.nets.models` signature
    `model(x, t, labels) -> eps` is wrapped with `elsfast.nets.models.eps_at` (abar mapped back to the network's time
    on `schedule`); any other callable is taken to be an eps_fn already."""
    if isinstance(network, torch.nn.Module):
        from ..nets.models import eps_at

        def eps_fn(x: torch.Tensor, abar: float, labels: torch.Tensor | None) -> torch.Tensor:
            return eps_at(network, x, abar, labels, schedule=schedule)

        return eps_fn
    if not callable(network):
        raise TypeError(f"the network must be a torch.nn.Module or a callable eps_fn(x, abar, labels), got {network!r}")
    return network


def network_denoiser(
    eps_fn: EpsFn, labels: torch.Tensor | None = None
) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
    """The `denoiser(x, abar, step) -> x0` of `ddim_sample` for a network given as an eps_fn:
    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)."""

    def denoiser(x: torch.Tensor, abar: float, step: int) -> torch.Tensor:
        eps = eps_fn(x, abar, labels).to(x)
        return (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)

    return denoiser


def seed_noise(seeds: Iterable[int], image_shape: Sequence[int]) -> torch.Tensor:
    """The initial noise of each seed, stacked: `[len(seeds), C, H, W]` float32 on the CPU; row k is
    `torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(seeds[k]))`."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
    rows = [torch.randn(1, *shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    if not rows:
        raise ValueError("no seeds given")
    return torch.cat(rows)


def seed_labels(seeds: Sequence[int], labels, classes: Sequence[int] | None) -> list[int | None]:
    """One label per seed (None throughout for unconditional runs, `classes is None`).

    `labels`: None (seed s gets `classes[s % len(classes)]`, i.e. `s % num_classes` when every class is present),
    one int for all seeds, a mapping seed -> label, a callable of the seed, or a sequence aligned with `seeds`.
    """
    seeds = [int(s) for s in seeds]
    if classes is None:
        if labels is not None:
            raise ValueError("labels were given for an unconditional run: pass conditional training labels")
        return [None] * len(seeds)
    classes = sorted(int(c) for c in classes)
    if labels is None:
        out = [classes[s % len(classes)] for s in seeds]
    elif isinstance(labels, int):
        out = [labels] * len(seeds)
    elif isinstance(labels, Mapping):
        missing = [s for s in seeds if s not in labels]
        if missing:
            raise ValueError(f"no label given for seeds {missing[:10]}")
        out = [int(labels[s]) for s in seeds]
    elif callable(labels):
        out = [int(labels(s)) for s in seeds]
    else:
        out = [int(v) for v in torch.as_tensor(labels).flatten().tolist()]
        if len(out) != len(seeds):
            raise ValueError(f"labels must give one label per seed ({len(seeds)}), got {len(out)}")
    unknown = sorted(set(out) - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown} have no training images (classes present: {classes})")
    return out


def _label_tensor(labels: Sequence[int | None]) -> torch.Tensor | None:
    return None if labels[0] is None else torch.tensor(labels, dtype=torch.int64)


def _schedule_name(schedule) -> str:
    return schedule if isinstance(schedule, str) else repr(schedule)


# --------------------------------------------------------------------------------------------------------------
# drawing with Pillow (no matplotlib)
# --------------------------------------------------------------------------------------------------------------

COLORS = {
    "network": (60, 60, 60),
    "els": (31, 119, 180),
    "ls": (255, 127, 14),
    "is": (44, 160, 44),
    "es": (214, 39, 40),
}
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 10))
        k += 1
    return ticks


class _Figure:
    """A minimal x-y plot on a Pillow canvas: axes with ticks, lines, points, bars, a legend, atomic PNG output."""

    def __init__(
        self,
        xlim: tuple[float, float],
        ylim: tuple[float, float],
        *,
        size: tuple[int, int] = (720, 460),
        title: str = "",
        xlabel: str = "",
        ylabel: str = "",
    ):
        from PIL import Image, ImageDraw

        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.small = _font(13), _font(11)
        self.left, self.right, self.top, self.bottom = 70, size[0] - 20, 40, size[1] - 55
        self.xlim, self.ylim = (float(xlim[0]), float(xlim[1])), (float(ylim[0]), float(ylim[1]))
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel

    def px(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        u = self.left + (x - x0) / (x1 - x0 or 1.0) * (self.right - self.left)
        v = self.bottom - (y - y0) / (y1 - y0 or 1.0) * (self.bottom - self.top)
        return u, v

    def _text(self, xy, text: str, anchor: str, font=None, fill=(0, 0, 0)) -> None:
        self.draw.text(xy, text, fill=fill, font=font or self.small, anchor=anchor)

    def axes(self, xticks: Sequence[float], yticks: Sequence[float], xfmt: str = "{:g}", yfmt: str = "{:g}") -> None:
        d = self.draw
        for y in yticks:
            u, v = self.px(self.xlim[0], y)
            d.line([(self.left, v), (self.right, v)], fill=(232, 232, 232))
            d.line([(self.left - 4, v), (self.left, v)], fill=(0, 0, 0))
            self._text((self.left - 7, v), yfmt.format(y), "rm")
        for x in xticks:
            u, v = self.px(x, self.ylim[0])
            d.line([(u, self.top), (u, self.bottom)], fill=(232, 232, 232))
            d.line([(u, self.bottom), (u, self.bottom + 4)], fill=(0, 0, 0))
            self._text((u, self.bottom + 7), xfmt.format(x), "mt")
        d.rectangle([self.left, self.top, self.right, self.bottom], outline=(0, 0, 0))
        if self.title:
            self._text(((self.left + self.right) / 2, 12), self.title, "mt", self.font)
        if self.xlabel:
            self._text(((self.left + self.right) / 2, self.bottom + 26), self.xlabel, "mt", self.font)
        if self.ylabel:
            self._text((8, self.top - 22), self.ylabel, "lt", self.font)

    def line(self, xs, ys, color, width: int = 2) -> None:
        pts = [self.px(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
        if len(pts) > 1:
            self.draw.line(pts, fill=color, width=width, joint="curve")

    def points(self, xs, ys, color, radius: float | Sequence[float] = 3.0, outline=None) -> None:
        radii = radius if isinstance(radius, Sequence) else [radius] * len(xs)
        for x, y, r in zip(xs, ys, radii, strict=True):
            if math.isfinite(x) and math.isfinite(y):
                u, v = self.px(x, y)
                self.draw.ellipse([u - r, v - r, u + r, v + r], fill=color, outline=outline)

    def bar(self, x0: float, x1: float, y: float, color) -> None:
        (u0, v), (u1, v0) = self.px(x0, y), self.px(x1, self.ylim[0])
        if v0 - v >= 0.5:
            self.draw.rectangle([u0, v, max(u0, u1 - 1), v0], fill=color)

    def legend(self, entries: Sequence[tuple[str, tuple[int, int, int]]], corner: str = "left") -> None:
        if not entries:
            return
        width = max(self.draw.textlength(label, font=self.small) for label, _ in entries) + 34
        x = self.left + 10 if corner == "left" else self.right - 10 - width
        y = self.top + 8
        self.draw.rectangle([x, y, x + width, y + 18 * len(entries) + 6], fill=(255, 255, 255), outline=(160,) * 3)
        for k, (label, color) in enumerate(entries):
            v = y + 12 + 18 * k
            self.draw.rectangle([x + 8, v - 5, x + 20, v + 5], fill=color)
            self._text((x + 26, v), label, "lm")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"plots are written as PNG: the path must end in .png, got {str(path)!r}")
        return atomic_write(path, lambda f: self.image.save(f, format="PNG"))


# --------------------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """The outcome of `calibrate`. Step index i stands for t = i / steps; i = 0 is never evaluated.

    - `sizes`: the candidate patch sizes, ascending (`K` of them); `seeds`, `labels`: one entry per seed (`S`);
    - `best`: `[S, steps]` int64, seed s's best P at step i (0 at i = 0, which is not evaluated);
    - `cosine`: `[S, steps, K]` float64, the cosine similarity of candidate k's eps with the network's eps
      (NaN at i = 0);
    - `scales` (property): the calibrated P(t), a list of length `steps` in the layout of
      `elsfast.reference_scales()`: entry i is the median over seeds of `best[:, i]` (the lower median, so it is
      always one of the candidates), entry 0 a copy of entry 1.
    """

    steps: int
    sizes: list[int]
    seeds: list[int]
    labels: list[int | None]
    best: torch.Tensor
    cosine: torch.Tensor
    schedule: str = "cosine-legacy"
    machine: dict = field(default_factory=dict)

    @property
    def times(self) -> list[float]:
        return [i / self.steps for i in range(self.steps)]

    @property
    def scales(self) -> list[int]:
        med = [int(self.best[:, i].median().item()) for i in range(1, self.steps)]
        return [med[0], *med]

    def cosine_median(self) -> torch.Tensor:
        """`[steps, K]`: the median over seeds of each candidate's cosine similarity (NaN at step 0)."""
        return self.cosine.nanmedian(dim=0).values

    def to_dict(self) -> dict:
        def per_step(row):
            return [None, *row[1:]]

        cos = self.cosine.tolist()
        return {
            "format": FORMAT,
            "about": (
                "Patch size P(t) calibrated against a network: entry i of 'scales' is for t = i/steps (entry 0 is "
                "never used by the sampler and repeats entry 1); it is the lower median over seeds of the P whose "
                "eps has the highest cosine similarity with the network's eps on the network's own trajectory."
            ),
            "steps": self.steps,
            "schedule": self.schedule,
            "sizes": list(self.sizes),
            "machine": self.machine,
            "t": self.times,
            "scales": self.scales,
            "seeds": list(self.seeds),
            "labels": list(self.labels),
            "best": {str(s): per_step(row) for s, row in zip(self.seeds, self.best.tolist(), strict=True)},
            "cosine": {str(s): per_step(rows) for s, rows in zip(self.seeds, cos, strict=True)},
            "cosine_median": per_step(self.cosine_median().tolist()),
        }

    def to_json(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON at `path`, atomically (directories created)."""
        text = json.dumps(self.to_dict(), indent=1).encode()
        return atomic_write(path, lambda f: f.write(text))

    @classmethod
    def from_json(cls, path: str | Path) -> CalibrationResult:
        """Read a calibration written by `to_json`; ValueError naming the file (and what it looks like) for any
        other file."""
        try:
            data = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, ValueError):
            data = None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path} is not an elsfast calibration: it looks like {describe_file(path)}")
        steps, k = data["steps"], len(data["sizes"])
        keys = [str(s) for s in data["seeds"]]
        best = torch.tensor([[0, *data["best"][key][1:]] for key in keys], dtype=torch.int64).reshape(-1, steps)
        nan_row = [float("nan")] * k
        cosine = torch.tensor([[nan_row, *data["cosine"][key][1:]] for key in keys], dtype=torch.float64)
        return cls(
            steps=steps,
            sizes=list(data["sizes"]),
            seeds=list(data["seeds"]),
            labels=list(data["labels"]),
            best=best,
            cosine=cosine.reshape(len(keys), steps, k),
            schedule=data["schedule"],
            machine=data.get("machine") or {},
        )

    def plot(self, path: str | Path) -> Path:
        """A PNG of P(t): for every step a grey disc per chosen P (area proportional to the number of seeds that
        chose it) and the median over seeds as a line. Written atomically."""
        lo, hi = min(self.sizes), max(self.sizes)
        fig = _Figure(
            (0.0, 1.0),
            (lo - 1, hi + 1),
            title=f"calibrated patch size P(t): {len(self.seeds)} seeds, {self.steps} steps",
            xlabel="t (noise level; the sampler runs from t = 1 down to 0)",
            ylabel="P",
        )
        fig.axes(_nice_ticks(0.0, 1.0, 10), self.sizes)
        n = len(self.seeds)
        for i in range(1, self.steps):
            values, counts = self.best[:, i].unique(return_counts=True)
            xs = [i / self.steps] * len(values)
            radii = [2.0 + 7.0 * math.sqrt(c / n) for c in counts.tolist()]
            fig.points(xs, [float(v) for v in values.tolist()], (175, 175, 175), radii, outline=(120, 120, 120))
        ts, med = self.times[1:], self.scales[1:]
        fig.line(ts, med, COLORS["els"], width=3)
        fig.points(ts, med, COLORS["els"], 3.5)
        fig.legend([("median over seeds", COLORS["els"]), ("seeds choosing P (area ~ count)", (175, 175, 175))])
        return fig.save(path)


def _machines_by_size(machines, sizes: Sequence[int] | None) -> tuple[list[int], dict[int, ScoreMachine]]:
    if isinstance(machines, ScoreMachine):
        sizes = sorted(DEFAULT_SIZES if sizes is None else sizes)
        return sizes, dict.fromkeys(sizes, machines)
    if isinstance(machines, Mapping):
        sizes = sorted(machines if sizes is None else sizes)
        missing = [p for p in sizes if p not in machines]
        if missing:
            raise ValueError(f"no machine given for patch sizes {missing}")
        return sizes, {p: machines[p] for p in sizes}
    if callable(machines):
        sizes = sorted(DEFAULT_SIZES if sizes is None else sizes)
        return sizes, {p: machines(p) for p in sizes}
    raise TypeError(
        "machines must be a ScoreMachine, a dict {patch size: ScoreMachine} or a factory patch size -> ScoreMachine, "
        f"got {type(machines).__name__}"
    )


def calibrate(
    eps_fn,
    machines,
    image_shape: Sequence[int] | None = None,
    *,
    sizes: Sequence[int] | None = None,
    seeds: Iterable[int] = range(10),
    steps: int = 20,
    labels_for_seed=None,
    conditional: bool | None = None,
    schedule: str | Callable[[float], float] = "cosine-legacy",
    batch_size: int | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Calibrate P(t) of a machine against a network (see the module docstring).

    Args:
        eps_fn: the network, `eps_fn(x, abar, labels) -> eps`, or a `torch.nn.Module` (wrapped by `as_eps_fn`,
            which maps abar to the network's time on `schedule`).
        machines: the candidate machines: one `ScoreMachine` evaluated at every size of `sizes`, a dict
            {P: ScoreMachine}, or a factory P -> ScoreMachine (called once per size).
        image_shape: (C, H, W); default and check: the machines' image shape.
        sizes: candidate (odd) patch sizes; default the dict's keys, or 3, 5, ..., 17.
        seeds: validation seeds; each one's noise is `seed_noise`.
        steps: sampler steps; the result's entry i belongs to t = i / steps.
        labels_for_seed: for conditional runs, the label of each seed (see `seed_labels`: None gives
            `seed % num_classes`; an int, a mapping, a callable or a sequence aligned with `seeds`). Both the
            network and the machines get it.
        conditional: whether the run is class-conditional; default: whether the machines have training labels.
        batch_size: seeds per batch (default all at once).
    """
    eps_fn = as_eps_fn(eps_fn, schedule)
    sizes, by_size = _machines_by_size(machines, sizes)
    if not sizes:
        raise ValueError("no candidate patch sizes")
    for p in sizes:
        if isinstance(p, bool) or int(p) != p or p < 1 or p % 2 == 0:
            raise ValueError(f"patch sizes must be odd positive integers, got {p!r}")
    first = by_size[sizes[0]]
    shape = tuple(first.image_shape)
    if image_shape is not None and tuple(int(s) for s in image_shape) != shape:
        raise ValueError(f"image_shape {tuple(image_shape)} differs from the machines' image shape {shape}")
    if any(tuple(m.image_shape) != shape for m in by_size.values()):
        raise ValueError("all candidate machines must have the same image shape")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    if conditional is None:
        conditional = first.labels is not None
    if conditional and any(m.labels is None for m in by_size.values()):
        raise ValueError("a conditional calibration needs machines built with train_labels")
    classes = first.labels.unique().tolist() if conditional else None
    labels = seed_labels(seeds, labels_for_seed, classes)
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    get_schedule(schedule)  # validates the name

    S, K = len(seeds), len(sizes)
    best = torch.zeros(S, steps, dtype=torch.int64)
    cosine = torch.full((S, steps, K), float("nan"), dtype=torch.float64)
    batch = S if batch_size is None else max(1, int(batch_size))
    for lo in tqdm(range(0, S, batch), desc="calibrating", disable=not progress or batch >= S, leave=False):
        rows = slice(lo, min(S, lo + batch))
        x = seed_noise(seeds[rows], shape)
        y = _label_tensor(labels[rows])

        def denoiser(x_t: torch.Tensor, abar: float, i: int, rows=rows, y=y) -> torch.Tensor:
            eps = eps_fn(x_t, abar, y).to(x_t)
            for k, p in enumerate(sizes):
                cosine[rows, i, k] = cosine_similarity(by_size[p].eps(x_t, abar, p, y), eps).cpu()
            return (x_t - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)

        ddim_sample(denoiser, x, steps=steps, schedule=schedule, progress=progress)
    # argmax takes the first maximum: ties go to the smallest P; a NaN cosine never wins
    scores = torch.nan_to_num(cosine[:, 1:], nan=-math.inf)
    best[:, 1:] = torch.tensor(sizes)[scores.argmax(dim=2)]
    return CalibrationResult(
        steps=steps,
        sizes=list(sizes),
        seeds=seeds,
        labels=labels,
        best=best,
        cosine=cosine,
        schedule=_schedule_name(schedule),
        machine={
            "machine": first.machine,
            "padding": first.padding,
            "conditional": bool(conditional),
            "train_shape": list(first.images.shape),
            "train_sha256": first.fingerprint,
        },
    )
