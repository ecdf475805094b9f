"""Comparing a trained network with the analytic machines, image by image (SPEC section 3, paper Table 1).

For every seed the network and each machine start from the *same* initial noise
(`torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(seed))`, float32 on the CPU) and, for
class-conditional runs, the same label. The network runs the one DDIM sampler (`elsfast.ddim_sample`) through
its eps (`network_steps` steps, e.g. 150 as in the paper's Table 1, default `steps`) from the machines' first t
(`elsfast.sampling.ddim.grid_times`); every machine runs `elsfast.sample` with `steps` steps and the patch-size
schedule `scales` (ignored by IS and ES). `protocol` names the paper's step counts (`elsfast.research.protocols`:
"table1", network 150 and machines 20; "table2", 20 and 20). Each machine image is scored against the network
image with

- Pearson r (`elsfast.research.metrics.pearson_r`): what the paper calls "r^2"; the paper's numbers are medians of it;
- R^2 (`elsfast.research.metrics.r_squared`), the coefficient of determination with the network image as the reference.

Reported: per machine the median r and median R^2 over seeds, and for ELS and LS (and ES) the fraction of seeds
on which their r beats IS's (a NaN r counts as a loss).

Output directory (`out_dir`):

- `results.json`: the run's configuration and one row per finished seed (`seed`, `label`, `r` and `r2` per
  machine). It is rewritten atomically after every seed, so an interrupted run resumes where it stopped: seeds
  already in the file are read back, never recomputed. A different configuration (training set, network tag,
  steps, schedule, scales, padding, machines...) raises `ValueError` instead of mixing runs; a different list
  of seeds is fine (rows of seeds not requested now stay in the file but are left out of the report).
- `samples/seed_NNNNN.pt`: the images of each seed (`{"network": [C, H, W], "els": ..., ...}`, float32), used for
  the grid and kept for later analysis.
- `summary.md`: the table (rows: machines; columns: median r, median R^2, fraction of seeds beating IS).
- `grid.png`: one row per seed (the first `grid_seeds` seeds), columns network | machines in order.
- `hist.png`: histogram of r per machine; `scatter.png`: ELS r (or the first non-IS machine) against IS r
  (`elsfast.plots.comparison`; they need matplotlib, `pip install elsfast[plots]`: without it they are skipped
  with a warning and everything else is written; `plot_results` draws them again from `results.json`).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.fileio import atomic_write, check_replaceable
from ..common.fingerprint import module_sha256, training_set_sha256
from ..common.imageio import make_grid
from ..common.scales import PatchSizeSpec, resolve_patch_size
from ..common.schedules import get_schedule, schedule_name
from ..machine import MACHINES, ScoreMachine
from ..nets.models import NetworkDenoiser
from ..plots.style import machine_name, matplotlib_missing
from ..sampling import ddim_sample
from ..sampling.ddim import GRIDS, grid_start, grid_times
from .calibrate import CalibrationResult, check_network_fits, label_tensor, resolve_network, seed_labels, seed_noise
from .metrics import pearson_r, r_squared
from .protocols import PROTOCOLS, protocol_of, protocol_steps

__all__ = ["compare", "load_results", "plot_results", "summarize"]

FORMAT = "elsfast-compare/1"


def _network_tag(network, tag: str | None) -> str | None:
    """The caller's tag, else for a torch module the SHA-256 of its parameters and buffers, else None."""
    if tag is not None:
        return str(tag)
    if isinstance(network, torch.nn.Module):
        return f"module-sha256:{module_sha256(network)}"
    return None


def _scale_list(scales, steps: int) -> list[int]:
    if isinstance(scales, CalibrationResult):
        scales = scales.scales
    elif isinstance(scales, Path) or (isinstance(scales, str) and scales.endswith(".json") and Path(scales).exists()):
        scales = json.loads(Path(scales).read_text())["scales"]
    size_at = resolve_patch_size(scales, steps)
    return [int(size_at(i / steps, i)) for i in range(steps)]


def load_results(out_dir: str | Path) -> dict | None:
    """The contents of `out_dir/results.json` (`format`, `config`, `rows`), or None if there is none."""
    path = Path(out_dir) / "results.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an elsfast comparison (format {data.get('format')!r})")
    return data


def _normalise(obj):
    return json.loads(json.dumps(obj))


def _check_config(path: Path, saved: dict, config: dict) -> None:
    saved = {"grid": "machine", **saved}  # results written before the grid was an option used elsfast's grid
    if "network_start_t" not in saved:  # written before the protocols: the network started on its own grid
        n = saved["network_steps"]
        saved = {
            "protocol": protocol_of(saved["steps"], n),
            "network_start_t": grid_start(saved["grid"], n) / n,
            **saved,
        }
    if saved == config:
        return
    keys = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}" for k in keys)
    raise ValueError(
        f"{path} holds a comparison with another configuration ({details}). Use another out_dir, or remove the "
        "file to start over."
    )


def _machine_denoiser(m: ScoreMachine, sizes: list[int], steps: int, labels: torch.Tensor | None):
    """The `denoiser(x, abar, i)` of `ddim_sample` for machine `m` with patch size `sizes[i]` at step i (the last
    entry at t = 1, for the "network" grid), as `elsfast.sample` runs it."""

    def denoiser(x: torch.Tensor, abar: float, i: int) -> torch.Tensor:
        return m.denoise(x, abar, sizes[min(i, len(sizes) - 1)], labels)

    return denoiser


def _median(values: list[float]) -> float:
    t = torch.tensor(values, dtype=torch.float64)
    if t.numel() == 0 or torch.isnan(t).all():
        return float("nan")
    return float(np.nanmedian(t.numpy()))


def summarize(rows: Sequence[dict], machines: Sequence[str]) -> dict:
    """Per machine: `n`, `median_r`, `median_r2`, `mean_r`, and for machines other than IS (when IS was run)
    `beats_is` (fraction of seeds whose r is strictly higher than IS's; NaN counts as a loss) and
    `beats_is_count`. Medians ignore NaN."""
    out = {}
    for name in machines:
        r = [row["r"][name] for row in rows]
        r2 = [row["r2"][name] for row in rows]
        finite = [v for v in r if v is not None and math.isfinite(v)]
        entry = {
            "n": len(rows),
            "median_r": _median(r),
            "median_r2": _median(r2),
            "mean_r": float(np.mean(finite)) if finite else float("nan"),
        }
        if name != "is" and "is" in machines:
            wins = sum(1 for row in rows if row["r"][name] > row["r"]["is"])  # NaN compares False
            entry["beats_is_count"] = wins
            entry["beats_is"] = wins / len(rows) if rows else float("nan")
        out[name] = entry
    return out


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _protocol_text(protocol: str | None) -> str:
    if protocol is None:
        return "none of the paper's protocols (other step counts)"
    return f"protocol `{protocol}` ({PROTOCOLS[protocol].description})"


def _summary_markdown(config: dict, summary: dict, seeds: list[int], files: dict, skipped: str | None) -> str:
    machines = config["machines"]
    lines = [
        "# Network vs analytic machines",
        "",
        f"{len(seeds)} seeds; network: `{config['network']}`; {_protocol_text(config['protocol'])}; "
        f"machines: {config['steps']} steps; network: {config['network_steps']} steps from "
        f"t = {config['network_start_t']:.6g}, where the machines start; step grid `{config.get('grid', 'machine')}` "
        f"({GRIDS[config.get('grid', 'machine')]}, the same noise for all); "
        f"schedule `{config['schedule']}`; padding `{config['padding']}`; "
        f"{'class-conditional' if config['conditional'] else 'unconditional'}; training set "
        f"{'x'.join(map(str, config['train_shape']))} (SHA-256 {config['train_sha256'][:12]}...).",
        f"Patch sizes P(t), entry i for t = i/{config['steps']}: {config['scales']}.",
        "",
        "| machine | median Pearson r | median R^2 | beats IS (fraction of seeds) |",
        "|---|---|---|---|",
    ]
    for name in machines:
        s = summary[name]
        beats = "-" if "beats_is" not in s else f"{_fmt(s['beats_is'], 2)} ({s['beats_is_count']}/{s['n']})"
        lines.append(f"| {machine_name(name)} | {_fmt(s['median_r'])} | {_fmt(s['median_r2'])} | {beats} |")
    lines += [
        "",
        "Pearson r is the correlation of the machine image with the network image over all pixels and channels "
        '(the number the paper calls "r^2"); R^2 = 1 - SS_res/SS_tot with the network image as the reference. '
        "Medians over seeds; 'beats IS': the machine's r is higher than IS's on that seed.",
        "",
    ]
    if files.get("grid"):
        cols = " | ".join(["network", *(machine_name(m) for m in machines)])
        lines.append(f"![samples]({Path(files['grid']).name}) (rows: seeds; columns: {cols})")
        lines.append("")
    if files.get("hist"):
        lines.append(f"![r per machine]({Path(files['hist']).name})")
    if files.get("scatter"):
        lines.append(f"![per-seed r]({Path(files['scatter']).name})")
    if skipped:
        lines.append(f"(hist.png and scatter.png were not drawn: {skipped})")
    lines.append("")
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> Path:
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data))


def _save_grid(path: Path, images: list[dict], machines: Sequence[str]) -> Path | None:
    from PIL import Image, ImageDraw

    columns = ["network", *machines]
    stack = torch.stack([img[c] for img in images for c in columns])
    c, h, w = stack.shape[1:]
    if c not in (1, 3):
        warnings.warn(f"no grid.png: images with {c} channels cannot be drawn", stacklevel=4)
        return None
    scale = max(1, round(64 / max(h, w)))
    pad = 4
    grid = make_grid(stack, nrow=len(columns), padding=pad, scale=scale)
    body = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).convert("RGB")
    header = 22
    canvas = Image.new("RGB", (body.width, body.height + header), "white")
    canvas.paste(body, (0, header))
    draw = ImageDraw.Draw(canvas)
    font = _grid_font(12)
    for k, name in enumerate(columns):
        centre = pad + k * (w * scale + pad) + w * scale / 2
        draw.text((centre, header / 2 + 2), machine_name(name), fill=(0, 0, 0), font=font, anchor="mm")
    return atomic_write(path, lambda f: canvas.save(f, format="PNG"))


def _grid_font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _draw_figures(out_dir: Path, rows: Sequence[dict], machines: Sequence[str]) -> dict[str, str]:
    """hist.png and scatter.png (the scatter when IS and another machine ran): their paths by name."""
    from ..plots.comparison import save_r_histogram, save_r_scatter

    files = {}
    r = {m: [row["r"][m] for row in rows] for m in machines}
    files["hist"] = str(save_r_histogram(out_dir / "hist.png", r))
    versus = next((m for m in machines if m != "is"), None)
    if versus is not None and "is" in machines:
        files["scatter"] = str(save_r_scatter(out_dir / "scatter.png", r["is"], r[versus], versus))
    return files


def plot_results(out_dir: str | Path, seeds: Iterable[int] | None = None) -> dict[str, str]:
    """(Re)draw `hist.png` and `scatter.png` in `out_dir` from its `results.json` (every saved seed, or `seeds`),
    without running anything; returns their paths by name. Needs matplotlib (`pip install elsfast[plots]`)."""
    out_dir = Path(out_dir)
    data = load_results(out_dir)
    if data is None:
        raise FileNotFoundError(f"{out_dir / 'results.json'} does not exist: nothing to draw")
    by_seed = {int(row["seed"]): row for row in data["rows"]}
    if seeds is not None:
        missing = [s for s in seeds if int(s) not in by_seed]
        if missing:
            raise ValueError(f"{out_dir / 'results.json'} has no rows for seeds {missing[:10]}")
    rows = [by_seed[int(s)] for s in (sorted(by_seed) if seeds is None else seeds)]
    return _draw_figures(out_dir, rows, data["config"]["machines"])


def compare(
    eps_fn,
    train_images: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int] | None = None,
    image_shape: Sequence[int] | None = None,
    *,
    out_dir: str | Path,
    scales: PatchSizeSpec | CalibrationResult = 3,
    seeds: Iterable[int] = range(100),
    steps: int = 20,
    network_steps: int | None = None,
    labels=None,
    conditional: bool | None = None,
    machines: Sequence[str] = ("els", "ls", "is"),
    padding: str = "zeros",
    schedule: str | Callable[[float], float] | None = None,
    network: str | None = None,
    machine_options: dict | None = None,
    grid_seeds: int = 8,
    progress: bool = True,
    grid: str = "machine",
    protocol: str | None = None,
) -> dict:
    """Compare a network with the machines seed by seed (see the module docstring); resumable.

    Args:
        eps_fn: the network, `eps_fn(x, abar, labels) -> eps`, a `torch.nn.Module` `model(x, t, labels)`
            (wrapped with `elsfast.nets.models.eps_at` on `schedule`), or a diffusers network (a
            `DiffusersNetwork` or "diffusers:DIR", `elsfast.research.calibrate.resolve_network`).
        train_images, train_labels: the machines' training set (`[N, C, H, W]` float in [-1, 1] or uint8;
            labels `[N]` for class-conditional runs).
        image_shape: (C, H, W); checked against the training images (default: theirs).
        out_dir: where results.json, samples/, summary.md and the PNGs go (see the module docstring).
        scales: the ELS/LS patch-size schedule: an int, a per-step list (entry i for t = i / steps), a callable
            of t, the name of a published list, a `CalibrationResult`, or the path of a calibration JSON file.
        seeds: the seeds to compare (the paper uses 100).
        steps: the machines' sampler steps (the paper: 20).
        network_steps: the network's sampler steps, default `steps` (the paper's Table 1: 150), from the same
            noise at the same t as the machines' first step, down to t = 0 in equal steps (`grid_times`).
        labels: per-seed labels for conditional runs (default seed % num_classes; see `calibrate.seed_labels`).
        conditional: default: whether `train_labels` is given. Both the network and the machines get the label.
        machines: names among "els", "ls", "is", "es".
        padding: the machines' padding ("zeros" or "circular"): match the network's.
        schedule: the noise schedule of the network and the machines (a name or a callable t -> abar); default:
            a diffusers network's own, else "cosine-legacy".
        network: a tag identifying the network (e.g. its checkpoint path and step), recorded in results.json so
            that resuming with another network raises; default for a diffusers network: its directory and a hash
            of its weights, for a `torch.nn.Module`: a hash of its weights, for a plain callable: None (not
            checked).
        machine_options: extra `ScoreMachine` arguments (`backend`, `device`, `dtype`, `memory_budget`).
        grid_seeds: how many seeds (the first ones) go into grid.png.
        grid: the step grid of the network and of every machine, the same for all (`elsfast.sampling.ddim.GRIDS`):
            "machine" (noise at t = (n-1)/n, elsfast's sampler and the authors' machine sampler) or "network"
            (noise at t = 1, the authors' network sampler; the machines then also make n updates from t = 1).
            The report states it.
        protocol: the paper's step counts by name (`elsfast.research.protocols.PROTOCOLS`): "table1" (network
            150 steps, machines 20) or "table2" (both 20); `steps` and `network_steps`, if given, must agree with
            it (ValueError otherwise). results.json's `config.protocol` names the protocol the step counts match
            (None for others), `config.network_start_t` the network's first t.

    Returns the report: `config`, `seeds`, `rows` (in seed order), `summary` (see `summarize`), `computed` (seeds
    computed by this call), `files` (paths written) and `figures_skipped`: None, or why hist.png and scatter.png
    were not drawn (matplotlib missing: `pip install elsfast[plots]`; the numbers and grid.png are written all
    the same, and a warning says so).
    """
    resolved, schedule, own_tag = resolve_network(eps_fn, schedule)
    tag = _network_tag(eps_fn, network if network is not None else own_tag)
    run = _validate(
        resolved, train_images, train_labels, image_shape, machines, seeds, labels,
        conditional, steps, network_steps, schedule, grid, padding, machine_options, protocol,
    )  # fmt: skip
    config = _configure(run, tag, scales)
    out_dir = Path(out_dir)
    rows = _resume(out_dir, run, config)
    todo = [s for s in run.seeds if s not in rows]
    _run_seeds(out_dir, run, config, rows, todo, progress)
    return _report(out_dir, run, config, rows, grid_seeds, computed=len(todo))


@dataclass(frozen=True)
class _Run:
    """What `compare` validated: the network as an eps_fn, the training set as the machines get it, the seeds
    with their labels, the step counts and the machines with their options."""

    eps_fn: Callable
    train_images: torch.Tensor
    train_labels: torch.Tensor | None
    shape: tuple[int, ...]
    machines: list[str]
    seeds: list[int]
    seed_label: dict[int, int | None]
    steps: int
    network_steps: int
    schedule: str | Callable[[float], float]
    grid: str
    start: int  # the machines' first step on the grid (`ddim_sample`'s start)
    network_times: tuple[float, ...]  # the network's grid, from the machines' first t (`grid_times`)
    padding: str
    options: dict


def _validate(
    eps_fn, train_images, train_labels, image_shape, machines, seeds, labels, conditional, steps, network_steps,
    schedule, grid, padding, machine_options, protocol,
) -> _Run:  # fmt: skip
    """`compare`'s arguments checked (ValueError naming the argument) and normalised."""
    if not isinstance(train_images, torch.Tensor) or train_images.dim() != 4:
        raise ValueError(f"train_images must be a tensor [N, C, H, W], got {getattr(train_images, 'shape', None)}")
    shape = tuple(int(s) for s in train_images.shape[1:])
    if image_shape is not None and tuple(int(s) for s in image_shape) != shape:
        raise ValueError(f"image_shape {tuple(image_shape)} differs from the training images' {shape}")
    machines = [str(m) for m in machines]
    unknown = [m for m in machines if m not in MACHINES]
    if unknown or not machines or len(set(machines)) != len(machines):
        raise ValueError(f"machines must be distinct names among {MACHINES}, got {machines}")
    if conditional is None:
        conditional = train_labels is not None
    if conditional and train_labels is None:
        raise ValueError("a conditional comparison needs train_labels")
    train_labels_used = torch.as_tensor(train_labels).to(torch.int64) if conditional else None
    classes = train_labels_used.unique().tolist() if conditional else None
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be a non-empty list of distinct integers")
    seed_label = dict(zip(seeds, seed_labels(seeds, labels, classes), strict=True))
    steps, network_steps = protocol_steps(protocol, steps, network_steps)
    if steps < 2 or network_steps < 2:
        raise ValueError(f"steps and network_steps must be at least 2, got {steps} and {network_steps}")
    get_schedule(schedule)
    start = grid_start(grid, steps, schedule)
    network_times = tuple(grid_times(grid, network_steps, shared_start=steps, schedule=schedule))
    check_network_fits(eps_fn, shape, conditional, classes, schedule, network_times[1:])  # where it is evaluated
    options = dict(machine_options or {})
    return _Run(
        eps_fn, train_images, train_labels_used, shape, machines, seeds, seed_label, int(steps), network_steps,
        schedule, grid, start, network_times, padding, options,
    )  # fmt: skip


def _configure(run: _Run, tag: str | None, scales) -> dict:
    """The run's configuration as results.json records it (a resumed run must match it): training set, network
    tag, machines, steps, protocol, the network's first t, step grid, schedule, per-step patch sizes, noise and
    machine options."""
    return _normalise(
        {
            "train_shape": list(run.train_images.shape),
            "train_sha256": training_set_sha256(run.train_images, run.train_labels),
            "conditional": run.train_labels is not None,
            "network": tag,
            "machines": run.machines,
            "padding": run.padding,
            "steps": run.steps,
            "network_steps": run.network_steps,
            "protocol": protocol_of(run.steps, run.network_steps),
            "network_start_t": run.network_times[-1],
            "grid": run.grid,
            "schedule": schedule_name(run.schedule),
            "scales": _scale_list(scales, run.steps),
            "noise": "torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(seed)), float32, CPU",
            "machine_options": {
                k: str(v) for k, v in sorted(run.options.items()) if k not in ("device", "memory_budget")
            },
        }
    )


def _resume(out_dir: Path, run: _Run, config: dict) -> dict[int, dict]:
    """The rows already in `out_dir/results.json` (by seed), after checking, before any seed runs, that every file
    the run will write is elsfast's to replace and that the saved run has this configuration and these labels."""
    for name in ("results.json", "grid.png", "hist.png", "scatter.png", "summary.md"):
        check_replaceable(out_dir / name)
    for seed in run.seeds:
        check_replaceable(_sample_path(out_dir, seed))
    saved = load_results(out_dir)
    rows: dict[int, dict] = {}
    if saved is None:
        return rows
    results_path = out_dir / "results.json"
    _check_config(results_path, saved["config"], config)
    for row in saved["rows"]:
        rows[int(row["seed"])] = row
    for s in run.seeds:
        if s in rows and rows[s]["label"] != run.seed_label[s]:
            raise ValueError(
                f"{results_path} has seed {s} with label {rows[s]['label']}, but label {run.seed_label[s]} was "
                "requested now; use another out_dir or the same labels"
            )
    return rows


def _sample_path(out_dir: Path, seed: int) -> Path:
    return out_dir / "samples" / f"seed_{seed:05d}.pt"


def _run_seeds(out_dir: Path, run: _Run, config: dict, rows: dict[int, dict], todo: list[int], progress: bool) -> None:
    """Sample and score the seeds `todo`, one after another; after each, its images go to samples/ and its row
    into `rows` and results.json (atomically), so an interrupted run resumes after the last finished seed."""
    built: dict[str, ScoreMachine] = {}
    for seed in tqdm(todo, desc="comparing", disable=not progress, leave=False):
        if not built:
            built = {
                m: ScoreMachine(run.train_images, run.train_labels, machine=m, padding=run.padding, **run.options)
                for m in run.machines
            }
        noise = seed_noise([seed], run.shape)
        y = label_tensor([run.seed_label[seed]])
        network = NetworkDenoiser(run.eps_fn, labels=y)
        images = {
            "network": ddim_sample(network, noise, times=run.network_times, schedule=run.schedule, progress=False)
        }
        for name, m in built.items():
            images[name] = ddim_sample(
                _machine_denoiser(m, config["scales"], run.steps, y),
                noise.to(m.device, m.dtype),
                steps=run.steps,
                schedule=run.schedule,
                progress=False,
                start=run.start,
            )
        images = {k: v.detach().float().cpu() for k, v in images.items()}
        row = {"seed": seed, "label": run.seed_label[seed], "r": {}, "r2": {}}
        for name in run.machines:
            row["r"][name] = float(pearson_r(images[name], images["network"])[0])
            row["r2"][name] = float(r_squared(images[name], images["network"])[0])
        stored = {k: v[0].clone() for k, v in images.items()}
        atomic_write(_sample_path(out_dir, seed), lambda f, stored=stored: torch.save(stored, f))
        rows[seed] = _normalise(row)
        data = {"format": FORMAT, "config": config, "rows": [rows[s] for s in sorted(rows)]}
        text = json.dumps(data, indent=1).encode()
        atomic_write(out_dir / "results.json", lambda f, text=text: f.write(text))


def _report(out_dir: Path, run: _Run, config: dict, rows: dict[int, dict], grid_seeds: int, computed: int) -> dict:
    """The report of the requested seeds (`computed` of them by this call): summary, grid.png of the first
    `grid_seeds`, the figures (skipped with a warning without matplotlib) and summary.md; see `compare`'s return
    value."""
    report_rows = [rows[s] for s in run.seeds]
    summary = summarize(report_rows, run.machines)
    files = {"results": str(out_dir / "results.json")}
    grid_images = []
    for s in run.seeds[: max(0, int(grid_seeds))]:
        path = _sample_path(out_dir, s)
        if path.exists():
            grid_images.append(torch.load(path, map_location="cpu", weights_only=True))
    if grid_images:
        grid_png = _save_grid(out_dir / "grid.png", grid_images, run.machines)
        if grid_png is not None:
            files["grid"] = str(grid_png)
    missing = matplotlib_missing()
    if missing is None:
        files.update(_draw_figures(out_dir, report_rows, run.machines))
    else:  # the numbers are all there: say what was not drawn instead of failing at the end of a long run
        warnings.warn(f"hist.png and scatter.png skipped: {missing}", stacklevel=3)
    files["summary"] = str(out_dir / "summary.md")
    _write_text(out_dir / "summary.md", _summary_markdown(config, summary, run.seeds, files, missing))
    return {
        "config": config,
        "seeds": run.seeds,
        "rows": report_rows,
        "summary": summary,
        "computed": computed,
        "files": files,
        "figures_skipped": missing,
    }
