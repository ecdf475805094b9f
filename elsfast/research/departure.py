"""Where a network leaves the patch mosaic (paper Section 6, Figs. 23/24): per compared seed, the per-pixel
departure |network - machine| beside the machine's provenance, and whether the departure sits where the mosaic is
inconsistent.

`departure(report_dir, train_images, train_labels)` reads a finished comparison (`elsfast.research.compare`:
`results.json` and `samples/seed_NNNNN.pt`) and, for every seed:

1. re-runs the machine's trajectory (ELS by default) exactly as `compare` ran it: the seed's noise
   (`calibrate.seed_noise`), its label, the step count, step grid, schedule, per-step patch sizes `scales`,
   padding and machine options recorded in `results.json`, on the training set whose SHA-256 it records. The
   last evaluation (the one whose x0 prediction is the image) is repeated with `return_provenance=True`: its
   `Provenance` (which training image, and which pixel of it, each output pixel came from) is the provenance of
   the final image. (Some backends round differently when they also return provenance, by up to a few float32
   ulps, so the image itself comes from the call `compare` made.) The re-run image must equal the stored one to
   `tolerance` (absolute, pixel units of images in [-1, 1]; default 1e-5): ValueError otherwise, naming the seed.
   Each row records the largest difference and whether the two are bit for bit equal (on the device and backend
   `compare` used they are);
2. the departure map `departure_map(network, machine)`: |network - machine| averaged over the channels
   (`CHANNEL_REDUCTION`), `[H, W]` float64;
3. the mosaic's boundaries (`mosaic_boundaries`) two ways: "image", pixels with a 4-neighbour whose source is
   another training image (the question of the paper's figures); "patch", also pixels whose 4-neighbour comes
   from the same training image but not from the adjacent pixel of the same copy (every seam of the mosaic);
4. `boundary_contrast`: the mean departure on boundary pixels, inside the consistent regions, and their ratio
   (above 1: the network departs more where the mosaic is inconsistent); and, graded, `neighbour_profile`: the
   mean departure against the number (0..4) of a pixel's inconsistent 4-neighbours and their correlation (for
   mosaics where nearly every pixel is on a boundary, as ELS's at P = 3 on 2,000 CIFAR-10 images), and the
   correlation of the departure with the provenance's posterior entropy (`pearson_entropy`).

Output, in `out_dir` (default `report_dir/departure`), written atomically after every seed so an interrupted run
resumes (a seed whose row and data file exist, computed from the same `samples/` file, is not recomputed; a
different machine or comparison configuration raises ValueError); no file elsfast did not write is replaced:

- `departure.json` (format `elsfast-departure/1`): the comparison's configuration, the definitions above, one row
  per seed and the summary over seeds (`summarize_departure`), and the `worst` seeds (lowest r in
  `results.json`);
- `seed_NNNNN.pt`: the seed's departure map, provenance and re-run image (to redraw the figures);
- `seed_NNNNN.png`: network | machine | departure map | provenance (`elsfast.plots.departure.departure_figure`);
- `worst.png`: the `worst` seeds where network and machine agree least, beside every seed's mean departure
  against the number of inconsistent neighbours (`elsfast.plots.departure.worst_seeds_figure`).

The figures need matplotlib (`pip install elsfast[plots]`): without it they are skipped with a warning and the
numbers are written all the same.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.fileio import atomic_write, check_replaceable, sha256_file
from ..common.fingerprint import training_set_sha256
from ..common.provenance import Provenance
from ..common.schedules import SCHEDULES, get_schedule
from ..machine import ScoreMachine
from ..plots.style import matplotlib_missing
from ..sampling import ddim_sample
from ..sampling.ddim import grid_start
from .calibrate import label_tensor, seed_noise
from .compare import load_results
from .metrics import pearson_r

__all__ = [
    "BOUNDARIES",
    "CHANNEL_REDUCTION",
    "FORMAT",
    "boundary_contrast",
    "departure",
    "departure_map",
    "inconsistent_neighbours",
    "load_departure",
    "mosaic_boundaries",
    "neighbour_profile",
    "rerun_machine",
    "summarize_departure",
]

FORMAT = "elsfast-departure/1"
CHANNEL_REDUCTION = "mean over the channels of |network - machine| (pixel units of images in [-1, 1])"
BOUNDARIES = {
    "image": "a pixel with a 4-neighbour whose source is another training image",
    "patch": "a pixel with a 4-neighbour from another training image, or from the same one but not the adjacent "
    "pixel of the same copy (source offsets differ): every seam of the mosaic",
}
"""The two definitions of a mosaic boundary (`mosaic_boundaries`'s `by`); every other pixel is interior."""

DEFAULT_TOLERANCE = 1e-5
"""Largest absolute difference allowed between the re-run machine image and the stored one (images in [-1, 1])."""


# --------------------------------------------------------------------------------------------------------------
# the measures
# --------------------------------------------------------------------------------------------------------------


def departure_map(network: torch.Tensor, machine: torch.Tensor) -> torch.Tensor:
    """|network - machine| averaged over the channels (`CHANNEL_REDUCTION`): `[..., C, H, W]` -> `[..., H, W]`
    float64, in pixel units of images in [-1, 1]."""
    if network.shape != machine.shape or network.dim() < 3:
        raise ValueError(
            f"network and machine images must have the same shape [..., C, H, W], got {list(network.shape)} and "
            f"{list(machine.shape)}"
        )
    return (network.double().cpu() - machine.double().cpu()).abs().mean(dim=-3)


def inconsistent_neighbours(provenance: Provenance, *, by: str = "image", wrap: bool = False) -> torch.Tensor:
    """How many of each pixel's 4-neighbours (inside the image) the mosaic joins inconsistently, int64 `[..., H, W]`
    in 0..4, like `provenance.source_image` (see `BOUNDARIES`).

    With `by="image"` an edge is inconsistent when its two sources are different training images; with
    `by="patch"` also when they are the same training image but the neighbour's source pixel is not the source
    pixel's own neighbour in that direction (differences taken modulo H and W when `wrap`, for circular padding).
    """
    if by not in BOUNDARIES:
        raise ValueError(f"by must be one of {', '.join(BOUNDARIES)}, got {by!r}")
    image = provenance.source_image
    H, W = image.shape[-2:]
    out = torch.zeros(image.shape, dtype=torch.int64, device=image.device)
    sy, sx = provenance.source_y.long(), provenance.source_x.long()
    for dim, size in ((-2, H), (-1, W)):
        first = [slice(None)] * image.dim()
        second = [slice(None)] * image.dim()
        first[dim], second[dim] = slice(0, -1), slice(1, None)
        first, second = tuple(first), tuple(second)
        broken = image[first] != image[second]
        if by == "patch":
            along, across = (sy, sx) if dim == -2 else (sx, sy)
            step = along[second] - along[first]
            shift = across[second] - across[first]
            if wrap:
                step, shift = step % size, shift % (W if dim == -2 else H)
            broken = broken | (step != 1) | (shift != 0)
        out[first] += broken.long()
        out[second] += broken.long()
    return out


def mosaic_boundaries(provenance: Provenance, *, by: str = "image", wrap: bool = False) -> torch.Tensor:
    """Boundary pixels of the mosaic, bool `[..., H, W]`: those with at least one inconsistent 4-neighbour
    (`inconsistent_neighbours`; `BOUNDARIES`). The image border is no boundary."""
    return inconsistent_neighbours(provenance, by=by, wrap=wrap) > 0


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def boundary_contrast(departure: torch.Tensor, boundary: torch.Tensor) -> dict:
    """The departure on and off the mosaic's boundaries, for one seed (`departure` float `[H, W]`, `boundary` bool
    `[H, W]`): `boundary_mean` and `interior_mean` (None for an empty set of pixels), `ratio` = boundary_mean /
    interior_mean (None when either is None or the interior mean is 0), `boundary_pixels`, `interior_pixels` and
    `boundary_fraction` of the pixels."""
    if departure.shape != boundary.shape or boundary.dtype != torch.bool:
        raise ValueError(
            f"departure and boundary must be [H, W] maps of the same shape (boundary bool), got "
            f"{list(departure.shape)} and {list(boundary.shape)} {boundary.dtype}"
        )
    departure, boundary = departure.cpu(), boundary.cpu()
    on, off = _mean(departure[boundary]), _mean(departure[~boundary])
    pixels = int(boundary.numel())
    count = int(boundary.sum())
    return {
        "boundary_mean": on,
        "interior_mean": off,
        "ratio": on / off if on is not None and off is not None and off > 0 else None,
        "boundary_pixels": count,
        "interior_pixels": pixels - count,
        "boundary_fraction": count / pixels,
    }


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    r = float(pearson_r(a.double().reshape(1, -1), b.double().reshape(1, -1))[0])
    return r if math.isfinite(r) else None


def neighbour_profile(departure: torch.Tensor, neighbours: torch.Tensor) -> dict:
    """The departure against the number of inconsistent 4-neighbours, for one seed (`departure` float `[H, W]`,
    `neighbours` int `[H, W]` from `inconsistent_neighbours`): `mean[k]` the mean departure of the pixels with k
    inconsistent neighbours (None when there is none), `pixels[k]` their number, k = 0..4, and `pearson` the
    correlation of departure and count over the pixels (None when either is constant). A graded answer where
    nearly every pixel is on a boundary."""
    if departure.shape != neighbours.shape:
        raise ValueError(f"departure {list(departure.shape)} and neighbours {list(neighbours.shape)} differ")
    departure, neighbours = departure.cpu(), neighbours.cpu()
    return {
        "mean": [_mean(departure[neighbours == k]) for k in range(5)],
        "pixels": [int((neighbours == k).sum()) for k in range(5)],
        "pearson": _pearson(departure, neighbours),
    }


def summarize_departure(rows: Sequence[dict]) -> dict:
    """Over seeds (rows of `departure.json`), for each boundary definition (`BOUNDARIES`): `seeds` (with a
    ratio), `median_ratio`, `above_one` (fraction of those seeds whose boundary mean exceeds the interior mean),
    `pooled_boundary_mean` and `pooled_interior_mean` (the mean departure over all boundary, resp. interior,
    pixels of all seeds), `pooled_ratio`, `mean_boundary_fraction`, `median_pearson_neighbours` (median over seeds
    of the correlation of departure and number of inconsistent neighbours) and `pooled_mean_by_neighbours` (the
    mean departure of all pixels with k = 0..4 inconsistent neighbours); and `median_mean_departure` (median over
    seeds of the mean departure per pixel) and `median_pearson_entropy` (median over seeds of the correlation of
    departure and the provenance's posterior entropy)."""
    out: dict = {"seeds": len(rows)}
    for by in BOUNDARIES:
        parts = [row[by] for row in rows]
        ratios = [p["ratio"] for p in parts if p["ratio"] is not None]
        pooled = {}
        for where in ("boundary", "interior"):
            total = sum(p[f"{where}_mean"] * p[f"{where}_pixels"] for p in parts if p[f"{where}_mean"] is not None)
            pixels = sum(p[f"{where}_pixels"] for p in parts)
            pooled[where] = total / pixels if pixels else None
        out[by] = {
            "seeds": len(ratios),
            "median_ratio": float(np.median(ratios)) if ratios else None,
            "above_one": sum(r > 1 for r in ratios) / len(ratios) if ratios else None,
            "pooled_boundary_mean": pooled["boundary"],
            "pooled_interior_mean": pooled["interior"],
            "pooled_ratio": pooled["boundary"] / pooled["interior"]
            if pooled["boundary"] is not None and pooled["interior"]
            else None,
            "mean_boundary_fraction": float(np.mean([p["boundary_fraction"] for p in parts])) if parts else None,
            "median_pearson_neighbours": _median([p["neighbours"]["pearson"] for p in parts]),
            "pooled_mean_by_neighbours": _pooled_profile([p["neighbours"] for p in parts]),
        }
    means = [row["mean_departure"] for row in rows]
    out["median_mean_departure"] = float(np.median(means)) if means else None
    out["median_pearson_entropy"] = _median([row["pearson_entropy"] for row in rows])
    return out


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.median(finite)) if finite else None


def _pooled_profile(profiles: Sequence[dict]) -> list[float | None]:
    """Mean departure of all pixels with k inconsistent neighbours over every seed, k = 0..4."""
    out = []
    for k in range(5):
        pixels = sum(p["pixels"][k] for p in profiles)
        total = sum(p["mean"][k] * p["pixels"][k] for p in profiles if p["mean"][k] is not None)
        out.append(total / pixels if pixels else None)
    return out


# --------------------------------------------------------------------------------------------------------------
# the machine's trajectory, again
# --------------------------------------------------------------------------------------------------------------


def rerun_machine(
    machine: ScoreMachine,
    config: dict,
    seed: int,
    label: int | None,
    schedule: str | Callable[[float], float] | None = None,
) -> tuple[torch.Tensor, Provenance]:
    """The machine image of `seed` as `compare` made it, and its provenance.

    `config` is the `config` of the comparison's `results.json` (`steps`, `scales`, `grid`, `schedule`); the
    trajectory starts from `seed_noise([seed])` with label `label` and runs `ddim_sample` with patch size
    `scales[min(i, steps - 1)]` at step i, as `compare` does. Returns the image `[C, H, W]` (float32, CPU, as
    `compare` stores it) and the `Provenance` of its pixels (tensors `[H, W]`, CPU) from the last evaluation,
    repeated with `return_provenance=True` on the same input. `schedule` replaces the recorded one (needed when
    the comparison ran with a callable schedule, recorded by its repr only).
    """
    steps, sizes = int(config["steps"]), [int(s) for s in config["scales"]]
    schedule = _schedule(config, schedule)
    y = label_tensor([label])
    last: dict = {}

    def denoiser(x: torch.Tensor, abar: float, i: int) -> torch.Tensor:
        size = sizes[min(i, len(sizes) - 1)]
        if i == 1:  # the last evaluation: its x0 prediction is the image
            last.update(x=x, abar=abar, size=size)
        return machine.denoise(x, abar, size, y)

    noise = seed_noise([seed], machine.image_shape).to(machine.device, machine.dtype)
    start = grid_start(config.get("grid", "machine"), steps, schedule)
    image = ddim_sample(denoiser, noise, steps=steps, schedule=schedule, progress=False, start=start)
    _, prov = machine.denoise(last["x"], last["abar"], last["size"], y, return_provenance=True)
    prov = Provenance(**{f.name: getattr(prov, f.name)[0].cpu() for f in fields(Provenance)})
    return image[0].detach().float().cpu(), prov


def _schedule(config: dict, schedule):
    recorded = config["schedule"]
    if schedule is None:
        if recorded not in SCHEDULES:
            raise ValueError(
                f"the comparison ran with the schedule {recorded!r}, which is not a named schedule: pass it "
                "(schedule=the same callable)"
            )
        return recorded
    if isinstance(schedule, str) and schedule != recorded:
        raise ValueError(f"schedule {schedule!r} differs from the comparison's {recorded!r}")
    get_schedule(schedule)
    return schedule


def _machine_options(config: dict, overrides: dict | None) -> dict:
    """`ScoreMachine` options from the comparison's recorded `machine_options` (strings), with `overrides`."""
    options: dict = {}
    for key, value in config.get("machine_options", {}).items():
        if key == "dtype":
            dtypes = {str(torch.float32): torch.float32, str(torch.float64): torch.float64}
            if value not in dtypes:
                raise ValueError(f"the comparison's machine dtype {value!r} is not float32 or float64")
            options[key] = dtypes[value]
        elif key in ("backend", "dictionary"):
            options[key] = value
        elif key not in (overrides or {}):
            raise ValueError(
                f"the comparison ran its machines with {key}={value!r}, which cannot be rebuilt from results.json: "
                f"pass machine_options={{{key!r}: ...}}"
            )
    options.update(overrides or {})
    return options


# --------------------------------------------------------------------------------------------------------------
# the directory
# --------------------------------------------------------------------------------------------------------------


def load_departure(out_dir: str | Path) -> dict | None:
    """The contents of `out_dir/departure.json`, or None if there is none."""
    path = Path(out_dir) / "departure.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an elsfast departure analysis (format {data.get('format')!r})")
    return data


def _data_path(out_dir: Path, seed: int) -> Path:
    return out_dir / f"seed_{seed:05d}.pt"


def _figure_path(out_dir: Path, seed: int) -> Path:
    return out_dir / f"seed_{seed:05d}.png"


def _sort_key(row: dict) -> tuple[float, int]:
    r = row["r"]
    return (r if r is not None and math.isfinite(r) else -math.inf, row["seed"])


def departure(
    report_dir: str | Path,
    train_images: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int] | None = None,
    *,
    seeds: Iterable[int] | None = None,
    machine: str = "els",
    worst: int = 6,
    out_dir: str | Path | None = None,
    schedule: str | Callable[[float], float] | None = None,
    machine_options: dict | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: bool = True,
) -> dict:
    """Where the network departs from `machine`'s mosaic, seed by seed, for a finished comparison (see the module
    docstring); resumable.

    Args:
        report_dir: the comparison's directory (`results.json`, `samples/`).
        train_images, train_labels: the machines' training set, as given to `compare` (its SHA-256 is checked
            against `results.json`; labels are needed for a class-conditional comparison).
        seeds: which of the comparison's seeds (default: all in `results.json`).
        machine: the compared machine whose mosaic is examined (default "els").
        worst: how many seeds, those with the lowest r, go into `worst.png`.
        out_dir: default `report_dir/departure`.
        schedule: for a comparison run with a callable schedule, the same callable.
        machine_options: extra `ScoreMachine` options (`device`, `memory_budget`, a configured `backend`);
            bit-for-bit reproduction needs the device and backend of the comparison.
        tolerance: largest |re-run - stored| pixel difference accepted (ValueError beyond it).

    Returns `departure.json`'s content plus `computed` (seeds computed by this call), `files` and
    `figures_skipped` (None, or why the figures were not drawn).
    """
    report_dir = Path(report_dir)
    results = load_results(report_dir)
    if results is None:
        raise FileNotFoundError(f"{report_dir / 'results.json'} does not exist: run the comparison first")
    config, by_seed = results["config"], {int(row["seed"]): row for row in results["rows"]}
    if machine not in config["machines"]:
        raise ValueError(f"machine {machine!r} was not compared in {report_dir}: it compared {config['machines']}")
    if isinstance(worst, bool) or int(worst) != worst or worst < 0:
        raise ValueError(f"worst must be an integer >= 0, got {worst!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    seeds = sorted(by_seed) if seeds is None else [int(s) for s in seeds]
    missing = [s for s in seeds if s not in by_seed]
    if missing or not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct seeds of {report_dir / 'results.json'}; not there: {missing[:10]}")
    labels = _check_training_set(report_dir, config, train_images, train_labels)
    schedule = _schedule(config, schedule)
    options = _machine_options(config, machine_options)
    out_dir = report_dir / "departure" if out_dir is None else Path(out_dir)

    samples = {s: report_dir / "samples" / f"seed_{s:05d}.pt" for s in seeds}
    absent = [str(p) for p in samples.values() if not p.exists()]
    if absent:
        raise FileNotFoundError(f"the comparison's images are missing: {', '.join(absent[:5])}")
    check_replaceable(out_dir / "departure.json", "departure")
    check_replaceable(out_dir / "worst.png", "figure")
    for s in seeds:
        check_replaceable(_data_path(out_dir, s), "departure")
        check_replaceable(_figure_path(out_dir, s), "figure")
    rows = _resume(out_dir, machine, config, tolerance)

    digests = {s: sha256_file(samples[s]) for s in seeds}
    todo = [
        s
        for s in seeds
        if s not in rows or rows[s]["samples_sha256"] != digests[s] or not _data_path(out_dir, s).exists()
    ]
    built = None
    for s in tqdm(todo, desc="departure", disable=not progress, leave=False):
        if built is None:
            built = ScoreMachine(train_images, labels, machine=machine, padding=config["padding"], **options)
        stored = torch.load(samples[s], map_location="cpu", weights_only=True)
        image, prov = rerun_machine(built, config, s, by_seed[s]["label"], schedule)
        diff = float((image.double() - stored[machine].double()).abs().max())
        if not diff <= tolerance:
            raise ValueError(
                f"seed {s}: the re-run {machine.upper()} image differs from the stored one by up to {diff:.3g} "
                f"(tolerance {tolerance:g}); run on the device and backend of the comparison (machine_options), "
                "or pass a larger tolerance"
            )
        rows[s] = _row(out_dir, s, by_seed[s], machine, stored, image, prov, config, digests[s], diff)
        _write_json(out_dir, machine, config, tolerance, rows, worst, files={})
    return _finish(report_dir, out_dir, machine, config, tolerance, rows, seeds, worst, todo)


def _check_training_set(report_dir: Path, config: dict, images, labels) -> torch.Tensor | None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"train_images must be a tensor [N, C, H, W], got {getattr(images, 'shape', None)}")
    if config["conditional"] and labels is None:
        raise ValueError(f"the comparison in {report_dir} is class-conditional: pass train_labels")
    used = torch.as_tensor(labels).to(torch.int64) if config["conditional"] else None
    if list(images.shape) != config["train_shape"] or training_set_sha256(images, used) != config["train_sha256"]:
        raise ValueError(
            f"train_images{' and train_labels' if used is not None else ''} ({list(images.shape)}) are not the "
            f"training set of the comparison in {report_dir} ({config['train_shape']}, SHA-256 "
            f"{config['train_sha256'][:12]}...): pass the images (and labels) it was run with"
        )
    return used


def _resume(out_dir: Path, machine: str, config: dict, tolerance: float) -> dict[int, dict]:
    saved = load_departure(out_dir)
    if saved is None:
        return {}
    path = out_dir / "departure.json"
    if saved["machine"] != machine or saved["comparison"] != config:
        what = "machine" if saved["machine"] != machine else "comparison configuration"
        raise ValueError(
            f"{path} holds the departure from another {what} (saved machine {saved['machine']!r}, now "
            f"{machine!r}): pass another out_dir, or remove {out_dir} to start over"
        )
    rows = {int(row["seed"]): row for row in saved["rows"]}
    return {s: row for s, row in rows.items() if row["reproduced"]["max_abs_diff"] <= tolerance}


def _row(out_dir: Path, seed: int, result: dict, machine: str, stored: dict, image, prov, config, digest, diff):
    """One seed's numbers; its data file (departure map, provenance, re-run image) is written here."""
    depart = departure_map(stored["network"], stored[machine])
    wrap = config["padding"] == "circular"
    data = {
        "format": FORMAT,
        "seed": seed,
        "departure": depart,
        "provenance": {f.name: getattr(prov, f.name) for f in fields(Provenance)},
        "image": image,
    }
    atomic_write(_data_path(out_dir, seed), lambda f: torch.save(data, f), kind="departure")
    row = {
        "seed": seed,
        "label": result["label"],
        "r": result["r"][machine],
        "samples_sha256": digest,
        "reproduced": {"max_abs_diff": diff, "bitwise": bool(torch.equal(image, stored[machine]))},
        "mean_departure": float(depart.mean()),
        "sources": int(prov.source_image.unique().numel()),
    }
    row["pearson_entropy"] = _pearson(depart, prov.entropy)
    for by in BOUNDARIES:
        count = inconsistent_neighbours(prov, by=by, wrap=wrap)
        row[by] = {**boundary_contrast(depart, count > 0), "neighbours": neighbour_profile(depart, count)}
    return json.loads(json.dumps(row))


def _worst(rows: Sequence[dict], worst: int) -> list[int]:
    return [row["seed"] for row in sorted(rows, key=_sort_key)[:worst]]


def _write_json(out_dir, machine, config, tolerance, rows: dict, worst: int, files: dict, seeds=None) -> dict:
    chosen = [rows[s] for s in (sorted(rows) if seeds is None else seeds)]
    data = {
        "format": FORMAT,
        "machine": machine,
        "comparison": config,
        "channel_reduction": CHANNEL_REDUCTION,
        "boundaries": BOUNDARIES,
        "tolerance": tolerance,
        "rows": [rows[s] for s in sorted(rows)],
        "seeds": [row["seed"] for row in chosen],
        "summary": summarize_departure(chosen),
        "worst": _worst(chosen, worst),
        "files": files,
    }
    text = json.dumps(data, indent=1).encode()
    atomic_write(out_dir / "departure.json", lambda f: f.write(text), kind="departure")
    return data


def _panels(stored: dict, data: dict, row: dict, machine: str) -> dict:
    """What the figures show of one seed: the images, departure map, provenance and the numbers."""
    return {
        "network": stored["network"],
        "machine_image": stored[machine],
        "departure": data["departure"],
        "provenance": Provenance(**data["provenance"]),
        "seed": row["seed"],
        "r": row["r"],
        "contrast": row["image"],
    }


def _finish(report_dir, out_dir, machine, config, tolerance, rows, seeds, worst, todo: list[int]) -> dict:
    """The figures (those of the seeds computed now or missing, and `worst.png`) and the final `departure.json`."""
    from ..plots.departure import save_departure_figure, save_worst_seeds_figure

    chosen = [rows[s] for s in seeds]
    skipped = matplotlib_missing()
    files: dict = {"departure": str(out_dir / "departure.json")}
    if skipped is not None:
        warnings.warn(f"the departure figures were skipped: {skipped}", stacklevel=3)
    else:
        worst_seeds = _worst(chosen, worst)
        panels = {}
        for s in seeds:
            draw = s in todo or not _figure_path(out_dir, s).exists()
            if not draw and s not in worst_seeds:
                continue
            stored = torch.load(report_dir / "samples" / f"seed_{s:05d}.pt", map_location="cpu", weights_only=True)
            data = torch.load(_data_path(out_dir, s), map_location="cpu", weights_only=True)
            panel = _panels(stored, data, rows[s], machine)
            if draw:
                save_departure_figure(_figure_path(out_dir, s), **panel, machine=machine)
            if s in worst_seeds:
                panels[s] = panel
        files["figures"] = [str(_figure_path(out_dir, s)) for s in seeds]
        if worst_seeds:
            items = [panels[s] for s in worst_seeds]
            curves = [(row["seed"], row["image"]["neighbours"]["mean"]) for row in chosen]
            pooled = summarize_departure(chosen)["image"]["pooled_mean_by_neighbours"]
            files["worst"] = str(save_worst_seeds_figure(out_dir / "worst.png", items, curves, pooled, machine=machine))
    data = _write_json(out_dir, machine, config, tolerance, rows, worst, files, seeds)
    return {**data, "computed": len(todo), "figures_skipped": skipped}
