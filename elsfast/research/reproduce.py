"""The reproduction pipeline (SPEC section 3) in one call: train a network, calibrate P(t), compare.

Each stage writes into one directory and is resumable, and a finished stage is never redone: training continues
from its checkpoint (written every few minutes and on SIGINT/SIGTERM) and stops for good at its steps or its time
limit (the training time of all runs together), calibration is skipped when its JSON exists, and the comparison
recomputes no finished seed. So a killed `elsfast reproduce` run, started again with the same command, continues
where it stopped, and a finished one reports its results. The function is split into its steps: `_validate`,
`_configure`, `_check_gpu`, the stages (`_train_stage`, `_calibration_stage`, `compare`) and `_report`.

Presets:

- `mnist-small` (2-core CPU, well under an hour): a conditional ResNet (64 channels, 6 residual blocks: the
  paper's 17x17 receptive field, a quarter of its width) with zero padding, trained for `train_minutes` (default
  20) on the 2,000 embedded MNIST digits (28x28) at learning rate 5e-4 (the paper's 1e-4 is for 300 epochs);
  ELS calibrated over P in 3..13 on 6 seeds; ELS, LS and IS compared with the network on 30 seeds, 20 steps.
- `fashion-mnist-small`, `cifar10-small` (3 channels), `faces-small` (a small UNet and the LS machine, as the
  paper's CelebA UNet row): the same reduced scale on the first 2,000 training images of the shared datasets.
- `mnist-paper`: the paper's configuration for MNIST ResNet (zeros): full MNIST padded to 32x32, 256 channels,
  batch 128, lr 1e-4, 300 epochs, unconditional; P in 3..17 on 10 seeds; 100 seeds. Needs a GPU and the data.
- one paper-scale preset for every CNN row of the paper's Table 1, named `DATASET-ARCH-PADDING`
  (`TABLE1`: MNIST, Fashion-MNIST, CIFAR-10 and the 32 x 32 grey faces standing in for CelebA, x ResNet/UNet x the
  paper's padding and conditioning), with the paper's training (SPEC section 3) and the machine the paper found
  best calibrated (LS for the faces UNet, ELS elsewhere). They need a GPU and the data; `reproduce` prints each
  one's cost (network steps, machine evaluations and pairs) before it starts.

Every preset names its comparison protocol (`Preset.protocol`, `elsfast.research.protocols`): the paper-scale
presets and `cifar10-sa-small` the paper's Table 1 (network 150 DDIM steps, machines 20, from the same noise at the
same t), the other CPU presets Table 2 (both 20), as their committed reports in docs/reproduction/ measured.
`reproduce(..., protocol=)` overrides it for one run; reproduction.json records it.

With `network=` (a `DiffusersNetwork` or "diffusers:DIR", `elsfast.research.calibrate.resolve_network`) there is no
training stage: the preset's data and settings calibrate and compare that network, on its own noise schedule. The
run is class-conditional exactly when the network is; a network whose image shape differs from the preset's data,
or whose class count differs from the data's, is refused before anything runs.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import datasets
from ..common.checks import check_device
from ..common.fileio import atomic_write, check_replaceable
from ..integrations.diffusers_network import is_network_spec, load_diffusers_network
from ..machine import ScoreMachine
from ..nets.train import (
    TrainConfig,
    checkpoint_summary,
    estimate_training_seconds,
    load_checkpoint,
    schedule_steps,
    train,
)
from ..plots.style import matplotlib_missing
from .calibrate import CalibrationResult, calibrate, check_network_fits, resolve_network
from .compare import compare
from .departure import departure
from .protocols import PROTOCOLS, protocol_steps

__all__ = ["OUTPUTS", "PRESETS", "TABLE1", "Preset", "describe_cost", "preset_cost", "reproduce"]

log = logging.getLogger("elsfast")


@dataclass(frozen=True)
class Preset:
    """One reproduction: how to train, which sizes to calibrate over, how many seeds to compare."""

    train: TrainConfig
    sizes: tuple[int, ...]
    calibration_seeds: int
    comparison_seeds: int
    steps: int = 20
    machines: tuple[str, ...] = ("els", "ls", "is")
    notes: str = ""
    calibrate_machine: str = "els"  # the machine whose P(t) is calibrated (the paper: LS for the CelebA UNet)
    paper_r: float | None = None  # the paper's Table 1 median for this configuration (of `calibrate_machine`)
    needs_gpu: bool = False  # paper-scale: refused without a GPU unless forced
    # a fixed P(t) instead of a calibration (any `patch_size` spec: a per-step list or a published list's name),
    # and where it comes from: the paper compares its attention UNet with the ELS machine at the scales
    # calibrated for the CIFAR-10 ResNet, not recalibrated (App. C)
    scales: tuple[int, ...] | str | None = None
    scales_source: str = ""
    # the comparison protocol (`elsfast.research.protocols.PROTOCOLS`: "table1", network 150 steps and machines
    # 20; "table2", both 20), or None: the network runs `steps` as the machines do
    protocol: str | None = None
    departure: bool = False  # after the comparison, where the network leaves the ELS mosaic (`research.departure`)


def _cpu_preset(train: TrainConfig, notes: str, **preset) -> Preset:
    """A reduced-scale preset for a 2-core CPU: P(t) calibrated over 3..13 on 6 seeds, compared on 30 seeds, by
    default with the paper's Table 2 protocol (network and machines 20 steps), as the committed reports were."""
    preset = {"protocol": "table2", **preset}
    return Preset(
        train=train, sizes=(3, 5, 7, 9, 11, 13), calibration_seeds=6, comparison_seeds=30, notes=notes, **preset
    )


# the network of the CPU presets: a 64-channel conditional ResNet (the paper's 17x17 receptive field, a quarter of
# its width), zero padding, at a learning rate for a short run
_SMALL_RESNET = dict(
    arch="resnet", channels=64, blocks=6, padding="zeros", conditional=True, lr=5e-4, checkpoint_every=200
)
# the small UNet of the CPU presets (widths 32, 64, 128; one residual block per level), zero padding, 1,200 steps
_SMALL_UNET = dict(
    limit=2000, channels=[32, 64, 128], blocks=1, padding="zeros", lr=5e-4, max_steps=1200, checkpoint_every=200
)

PRESETS: dict[str, Preset] = {
    "mnist-small": _cpu_preset(
        TrainConfig(dataset="mnist-embedded", max_minutes=20, **_SMALL_RESNET),
        "reduced scale for a 2-core CPU: 64-channel conditional ResNet, 2,000 MNIST digits, time-limited",
    ),
    "fashion-mnist-small": _cpu_preset(
        TrainConfig(dataset="fashion-mnist", limit=2000, max_steps=1200, **_SMALL_RESNET),
        "reduced scale for a 2-core CPU: 64-channel conditional ResNet, the first 2,000 Fashion-MNIST "
        "training images (28x28), 1,200 training steps; needs the data",
        paper_r=0.94,
    ),
    "cifar10-small": _cpu_preset(
        TrainConfig(dataset="cifar10", limit=2000, max_steps=1200, **_SMALL_RESNET),
        "reduced scale for a 2-core CPU: 64-channel conditional ResNet, the first 2,000 CIFAR-10 training "
        "images (32x32, 3 channels), 1,200 training steps; needs the data",
        paper_r=0.95,
    ),
    "faces-small": _cpu_preset(
        TrainConfig(dataset="faces", arch="unet", conditional=False, **_SMALL_UNET),
        "reduced scale for a 2-core CPU: a small unconditional UNet (widths 32, 64, 128), the first 2,000 "
        "32x32 grey faces standing in for CelebA, LS calibrated as for the paper's CelebA UNet, 1,200 training "
        "steps; needs the data",
        machines=("ls", "els", "is"),
        calibrate_machine="ls",
        paper_r=0.90,
    ),
    "mnist-paper": Preset(
        train=TrainConfig(dataset="mnist", pad_to=32, arch="resnet", padding="zeros", conditional=False),
        sizes=(3, 5, 7, 9, 11, 13, 15, 17),
        calibration_seeds=10,
        comparison_seeds=100,
        notes="the paper's MNIST ResNet (zeros) configuration (SPEC section 3); needs a GPU",
        needs_gpu=True,
        protocol="table1",
    ),
}


# The CNN rows of the paper's Table 1 (150-step network, 20-step machine): dataset, architecture, padding,
# class-conditional, the machine the paper reports as best, its median r.
TABLE1 = (
    ("mnist", "unet", "zeros", False, "els", 0.89),
    ("cifar10", "unet", "zeros", True, "els", 0.90),
    ("fashion-mnist", "unet", "zeros", True, "els", 0.93),
    ("faces", "unet", "zeros", False, "ls", 0.90),
    ("mnist", "resnet", "zeros", False, "els", 0.94),
    ("mnist", "resnet", "circular", False, "els", 0.77),
    ("cifar10", "resnet", "zeros", True, "els", 0.95),
    ("cifar10", "resnet", "circular", True, "els", 0.94),
    ("fashion-mnist", "resnet", "zeros", True, "els", 0.94),
    ("faces", "resnet", "zeros", False, "els", 0.96),
)

for _dataset, _arch, _padding, _conditional, _machine, _r in TABLE1:
    PRESETS[f"{_dataset}-{_arch}-{_padding}"] = Preset(
        train=TrainConfig(
            dataset=_dataset,
            pad_to=32 if "mnist" in _dataset else None,
            arch=_arch,
            padding=_padding,
            conditional=_conditional,
        ),
        sizes=(3, 5, 7, 9, 11, 13, 15, 17),
        calibration_seeds=10,
        comparison_seeds=100,
        calibrate_machine=_machine,
        paper_r=_r,
        needs_gpu=True,
        protocol="table1",
        notes=(
            f"the paper's {_dataset} {_arch.upper() if _arch == 'unet' else 'ResNet'} ({_padding}"
            f"{', class-conditional' if _conditional else ''}) configuration, Table 1: {_machine.upper()} r = {_r}; "
            "needs a GPU"
        ),
    )


# The paper's attention row (Section 6, App. C): a class-conditional UNet with self-attention, compared with the ELS
# machine at the P(t) calibrated for the CIFAR-10 ResNet. At CPU scale that P(t) is `cifar10-small`'s calibration
# (docs/reproduction/cifar10-small/calibration.json, measured 2026-12-02 and reproduced exactly 2026-12-03).
CIFAR10_SMALL_SCALES = (3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 9, 9, 9, 9)

PRESETS["cifar10-sa-small"] = _cpu_preset(
    TrainConfig(dataset="cifar10", arch="unet-sa", conditional=True, **_SMALL_UNET),
    "reduced scale for a 2-core CPU: a small class-conditional UNet with self-attention at 16x16 and 8x8 (widths "
    "32, 64, 128), the first 2,000 CIFAR-10 training images, 1,200 training steps, compared with the ELS machine "
    "at cifar10-small's calibrated P(t), not recalibrated, as the paper did, with the paper's Table 1 protocol "
    "(network 150 steps, machines 20; the paper's Table 1 row, r = 0.77); needs the data",
    paper_r=0.77,
    protocol="table1",
    scales=CIFAR10_SMALL_SCALES,
    scales_source="cifar10-small's calibrated P(t) (the CIFAR-10 ResNet's, as in the paper)",
    departure=True,
)
PRESETS["cifar10-unet-sa-zeros"] = Preset(
    train=TrainConfig(dataset="cifar10", arch="unet-sa", padding="zeros", conditional=True),
    sizes=(3, 5, 7, 9, 11, 13, 15, 17),
    calibration_seeds=10,
    comparison_seeds=100,
    paper_r=0.77,
    needs_gpu=True,
    protocol="table1",
    scales="CIFAR10_ResNet_zeros_conditional",
    scales_source="the published P(t) of the paper's CIFAR-10 ResNet (zeros, class-conditional)",
    departure=True,
    notes="the paper's CIFAR-10 UNet with self-attention (zeros, class-conditional; widths 64, 128, 256, attention "
    "at 16x16 and 8x8), compared at the CIFAR-10 ResNet's published P(t), not recalibrated, Table 1: ELS r = "
    "0.77; needs a GPU",
)


OUTPUTS = {
    "network.pt": "network",
    "calibration.json": "calibration",
    "calibration.png": "figure",
    "reproduction.json": "reproduction",
}
"""The files `reproduce` writes in its folder (besides `report/`, checked by `compare`), and their kinds."""


def preset_cost(preset: Preset, images: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """What a preset costs on `images` `[N, C, H, W]`: network training steps, machine evaluations of the
    calibration and the comparison, and the query x dictionary pairs of one evaluation of one image for each
    compared machine at the smallest and largest calibrated patch size (`estimate.evaluation_pairs`)."""
    from ..sampling.estimate import evaluation_pairs

    config = preset.train
    per_epoch = math.ceil(len(images) / config.batch_size)
    steps = config.max_steps if config.max_steps is not None else per_epoch * config.epochs
    label = None if labels is None or not config.conditional else labels[:1]
    pairs = {}
    for name in preset.machines:
        m = ScoreMachine(images, labels if config.conditional else None, machine=name, padding=config.padding)
        sizes = (min(preset.sizes), max(preset.sizes)) if name in ("ls", "els") else (3,)
        pairs[name] = {int(P): evaluation_pairs(m, 1, P, label) for P in sizes}
    evaluations = preset.steps - 1
    return {
        "network_steps": int(steps),
        "network_epochs": config.epochs if config.max_steps is None else None,
        "calibration_evaluations": 0
        if preset.scales is not None
        else preset.calibration_seeds * evaluations * len(preset.sizes),
        "comparison_evaluations": preset.comparison_seeds * evaluations * len(preset.machines),
        "pairs_per_evaluation": pairs,
    }


def describe_cost(cost: dict) -> str:
    """The cost of `preset_cost` in one paragraph for the user."""
    pairs = "; ".join(
        f"{name.upper()} " + ", ".join(f"{v:.2g} at P={P}" for P, v in by_size.items())
        for name, by_size in cost["pairs_per_evaluation"].items()
    )
    return (
        f"expected cost: {cost['network_steps']:,} network training steps; "
        f"{cost['calibration_evaluations']:,} machine evaluations to calibrate and "
        f"{cost['comparison_evaluations']:,} to compare (one image each); pairs per evaluation: {pairs}"
    )


@dataclass(frozen=True)
class _Run:
    """What one `reproduce` call does: the preset as configured by its arguments, the data, and where."""

    name: str
    preset: Preset
    out: Path
    data: datasets.Dataset
    device: str | None
    grid: str

    @property
    def config(self) -> TrainConfig:
        return self.preset.train

    @property
    def labels(self) -> torch.Tensor | None:
        return self.data.labels if self.config.conditional else None


def _validate(preset: str | Preset, train_steps: int | None, out: Path, protocol: str | None) -> tuple[str, Preset]:
    """Validate: the preset, the arguments (the protocol, `protocol` or the preset's, agreeing with its steps),
    and the outputs (writable, and replaceable by this command) before any work. Returns the preset's name and
    the preset with the protocol of this run."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        name, preset = preset, PRESETS[preset]
    else:
        name = "custom"
    if train_steps is not None and train_steps < 1:
        raise ValueError(f"train_steps must be >= 1, got {train_steps}")
    preset = replace(preset, protocol=preset.protocol if protocol is None else protocol)
    chosen = PROTOCOLS.get(preset.protocol)
    if chosen is not None and chosen.steps != preset.steps:
        raise ValueError(
            f"protocol {preset.protocol!r} runs the machines for {chosen.steps} steps, but preset {name} runs them "
            f"for {preset.steps}: give a protocol with {preset.steps} machine steps, or a preset with protocol=None"
        )
    protocol_steps(preset.protocol, preset.steps, None)  # an unknown name is refused here
    for file, kind in OUTPUTS.items():  # refused now rather than after hours of work
        if file != "network.pt" or not (out / file).exists():  # an existing network.pt is resumed (and checked)
            check_replaceable(out / file, kind)
    return name, preset


def _configure(
    name: str,
    preset: Preset,
    out: Path,
    *,
    root,
    device: str | None,
    train_minutes: float | None,
    train_steps: int | None,
    comparison_seeds: int | None,
    checkpoint_minutes: float | None,
    grid: str,
) -> _Run:
    """Configure: the preset with this call's training limits, seeds and paths; its training data."""
    train = preset.train
    config = replace(
        train,
        out=str(out / "network.pt"),
        root=None if root is None else str(root),
        device=device,
        max_minutes=train_minutes if train_minutes is not None else train.max_minutes,
        max_steps=train_steps if train_steps is not None else train.max_steps,
        checkpoint_minutes=checkpoint_minutes if checkpoint_minutes is not None else train.checkpoint_minutes,
    )
    seeds = comparison_seeds if comparison_seeds is not None else preset.comparison_seeds
    preset = replace(preset, train=config, comparison_seeds=seeds)  # what this run does, for its cost
    data = datasets.load(config.dataset, root=config.root, pad_to=config.pad_to, limit=config.limit)
    return _Run(name, preset, out, data, device, grid)


def _check_gpu(run: _Run, force: bool) -> None:
    """A paper-scale preset (`Preset.needs_gpu`) without a GPU is refused unless `force`, with its training time
    estimated here (`estimate_training_seconds`)."""
    device = check_device("auto" if run.device is None else run.device)
    if not run.preset.needs_gpu or device.type == "cuda" or force:
        return
    config, images = run.config, run.data.images
    steps = schedule_steps(config, len(images))
    classes = run.data.num_classes or (int(run.data.labels.max()) + 1 if run.data.labels is not None else None)
    seconds = estimate_training_seconds(config, tuple(images.shape[1:]), classes, steps, device)
    raise ValueError(
        f"preset {run.name} is paper-scale and needs a GPU: on this {device.type.upper()} its training alone would "
        f"take about {seconds / 3600:,.0f} h ({steps:,} steps at about {seconds / steps:.2g} s each, timed here); "
        "run it on a GPU (--device cuda), or pass force=True (--force) to run it here anyway"
    )


def _train_stage(run: _Run, progress: bool) -> dict:
    """Train, or resume the training. A time limit counts the training time of every call together, so a run
    that reached it (recorded in the checkpoint) or finished its steps trains no more and keeps `network.pt`."""
    config = run.config
    path = Path(config.out)
    before = checkpoint_summary(path) if path.exists() else None
    if config.max_minutes is not None and before is not None:
        config = replace(config, max_minutes=max(config.max_minutes - before["total_seconds"] / 60.0, 0.0))
    trained = train(config, resume=True, progress=progress, images=run.data.images, labels=run.data.labels)
    if progress and before is not None and trained["steps"] == before["steps"]:
        why = "its steps are done" if trained["finished"] else "its time limit was reached"
        print(
            f"elsfast reproduce {run.name}: nothing to train ({why}; network.pt at step {trained['steps']:,})",
            file=sys.stderr,
        )
    return trained


def _calibration_stage(run: _Run, model, padding: str, network_tag: str, progress: bool) -> CalibrationResult:
    """Calibrate P(t), or read the calibration of an earlier call (refused when made for another network)."""
    preset, out = run.preset, run.out
    calibration_path = out / "calibration.json"
    if calibration_path.exists():
        calibration = CalibrationResult.from_json(calibration_path)
        if calibration.network not in (None, network_tag):
            raise ValueError(
                f"{calibration_path} was calibrated against {calibration.network}, and the network is now "
                f"{network_tag}: remove {calibration_path}, calibration.png and report/ to calibrate and compare "
                "it again, or use another out_dir"
            )
    else:
        machine = ScoreMachine(
            run.data.images, run.labels, machine=preset.calibrate_machine, padding=padding, device=run.device
        )
        calibration = calibrate(
            model,
            machine,
            sizes=preset.sizes,
            seeds=range(preset.calibration_seeds),
            steps=preset.steps,
            conditional=run.config.conditional,
            progress=progress,
        )
        calibration.network = network_tag
        calibration.to_json(calibration_path)
    if not (out / "calibration.png").exists():  # drawn now, or on a later run if matplotlib was missing then
        skipped = matplotlib_missing()
        if skipped is None:
            calibration.plot(out / "calibration.png")
        else:
            warnings.warn(f"calibration.png skipped (calibration.json written): {skipped}", stacklevel=3)
            if progress:
                print(f"elsfast reproduce {run.name}: calibration.png skipped: {skipped}", file=sys.stderr)
    return calibration


def _given_network(run: _Run, network) -> tuple[_Run, object, str]:
    """The run on a given network (no training): `(run, eps_fn, tag)`, the run class-conditional exactly when the
    network is; ValueError when the network does not fit the preset's data (image shape, labels, class count)."""
    if is_network_spec(network):
        network = load_diffusers_network(network, device=run.device)
    eps_fn, _, tag = resolve_network(network)
    if tag is None:
        raise ValueError("reproduce's network must be a diffusers network: a DiffusersNetwork or 'diffusers:DIR'")
    data = run.data
    conditional = bool(eps_fn.conditional)
    check_network_fits(eps_fn, tuple(data.images.shape[1:]), conditional, None)
    if conditional and data.labels is None:
        raise ValueError(f"the network {tag} is class-conditional, but {data.name} has no labels")
    classes = data.num_classes or (None if data.labels is None else int(data.labels.max()) + 1)
    if conditional and eps_fn.num_classes is not None and eps_fn.num_classes != classes:
        raise ValueError(
            f"the network {tag} has {eps_fn.num_classes} classes and preset {run.name}'s data {data.name} has "
            f"{classes}: use a network trained on that data"
        )
    run = replace(run, preset=replace(run.preset, train=replace(run.config, conditional=conditional)))
    return run, eps_fn, tag


def _report(
    run: _Run, cost: dict, trained: dict | None, calibration: CalibrationResult | None, report: dict, network: str
) -> dict:
    """Report: `reproduction.json` with the headline numbers (written atomically); returns its content.
    `calibration` is None for a preset with fixed scales (`Preset.scales`); `trained` None for a given network."""
    preset = run.preset
    calibrated = {"calibration": str(run.out / "calibration.json")} if calibration is not None else {}
    summary = {
        "preset": run.name,
        "notes": preset.notes,
        "paper_r": preset.paper_r,
        "calibrated_machine": preset.calibrate_machine,
        "cost": cost,
        "network": network,
        "conditional": run.config.conditional,
        "training": None
        if trained is None
        else {k: trained[k] for k in ("total_steps", "steps", "loss", "total_seconds", "finished", "stopped")},
        "scales": report["config"]["scales"],
        "scales_source": "calibrated" if calibration is not None else preset.scales_source,
        "grid": run.grid,
        "protocol": report["config"]["protocol"],
        "steps": report["config"]["steps"],
        "network_steps": report["config"]["network_steps"],
        "network_start_t": report["config"]["network_start_t"],
        "summary": report["summary"],
        "files": {"network": run.config.out if trained is not None else network, **calibrated, **report["files"]},
        "torch": torch.__version__,
        "device": run.device or "cpu",
    }
    text = json.dumps(summary, indent=2, default=str).encode()
    atomic_write(run.out / "reproduction.json", lambda f: f.write(text), kind="reproduction")
    return summary


def reproduce(
    preset: str | Preset,
    out_dir: str | Path,
    *,
    root: str | Path | None = None,
    device: str | None = None,
    train_minutes: float | None = None,
    train_steps: int | None = None,
    comparison_seeds: int | None = None,
    progress: bool = True,
    grid: str = "machine",
    checkpoint_minutes: float | None = None,
    force: bool = False,
    protocol: str | None = None,
    network=None,
) -> dict:
    """Run (or resume) a reproduction into `out_dir`: `network.pt`, `calibration.json`/`.png`, `report/`
    (see `elsfast.research.compare`) and `reproduction.json` with the headline numbers. Returns that summary.

    A finished stage is never redone: run again, the same call trains no more (the steps are done, or the time
    limit, which counts the training time of all calls together, is reached and recorded in `network.pt`),
    reads the calibration and recomputes no finished seed, so a finished reproduction just reports its results
    and an interrupted one continues where it stopped. SIGINT/SIGTERM during the training write its checkpoint
    first; it is also written every `checkpoint_minutes` of wall time (the preset's, 5, unless given).

    `train_minutes` and `train_steps` replace the preset's training time limit and step count (a total from step
    0; a run that stopped earlier, or a `network.pt` copied from another run of the same preset, trains on to it).
    The calibration and the comparison name the network's training step: after the network has trained on, the
    old `calibration.json` and `report/` are refused (ValueError saying what to remove), never mixed with it.

    A paper-scale preset (`Preset.needs_gpu`) on a machine without a GPU is refused (ValueError with its
    estimated training time) unless `force=True`. The outputs are checked (folder writable, no foreign file)
    before anything is loaded.

    `grid` is the comparison's step grid, the same for the network and the machines (`compare`'s `grid`:
    "machine", noise at t = (n-1)/n, or "network", noise at t = 1 as in the authors' network sampler).
    `protocol` replaces the preset's comparison protocol (`Preset.protocol`: "table1", the network 150 steps and
    the machines 20 from the same noise at the same t; "table2", both 20); reproduction.json records it, with the
    network's steps and first t. A comparison in `report/` made with another protocol is refused, not mixed.

    `network`: a diffusers network (`DiffusersNetwork` or "diffusers:DIR") to calibrate and compare instead of
    training one (see the module docstring); the training arguments are then not used."""
    out = Path(out_dir)
    name, preset = _validate(preset, train_steps, out, protocol)
    run = _configure(
        name,
        preset,
        out,
        root=root,
        device=device,
        train_minutes=train_minutes,
        train_steps=train_steps,
        comparison_seeds=comparison_seeds,
        checkpoint_minutes=checkpoint_minutes,
        grid=grid,
    )
    if network is not None:
        run, model, network_tag = _given_network(run, network)
    else:
        _check_gpu(run, force)  # the training's cost
    cost = preset_cost(run.preset, run.data.images, run.data.labels)
    if network is not None:
        cost = {**cost, "network_steps": 0, "network_epochs": None}  # nothing to train
    log.info("elsfast reproduce %s: %s", name, describe_cost(cost))
    if progress:
        print(f"elsfast reproduce {name}: {describe_cost(cost)}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)

    if network is None:
        trained = _train_stage(run, progress)
        model, model_config, _ = load_checkpoint(run.config.out, device=device)
        padding = model_config["model"]["padding"]
        network_tag = f"{run.config.out} at step {trained['steps']}"
    else:
        trained, padding = None, run.config.padding
    fixed = run.preset.scales is not None  # compared at a given P(t) (`Preset.scales`), not calibrated
    calibration = None if fixed else _calibration_stage(run, model, padding, network_tag, progress)
    report = compare(
        model,
        run.data.images,
        run.labels,
        out_dir=out / "report",
        scales=run.preset.scales if fixed else calibration,
        seeds=range(1000, 1000 + run.preset.comparison_seeds),  # disjoint from the calibration seeds
        steps=run.preset.steps,
        protocol=run.preset.protocol,
        conditional=run.config.conditional,
        machines=run.preset.machines,
        padding=padding,
        network=network_tag,
        progress=progress,
        grid=grid,
    )
    if run.preset.departure:  # report/departure/: |network - ELS| beside the ELS provenance, seed by seed
        schedule = getattr(model, "schedule", None) if network is not None else None  # a given network's own
        found = departure(out / "report", run.data.images, run.labels, schedule=schedule, progress=progress)
        report["files"]["departure"] = found["files"]["departure"]
    return _report(run, cost, trained, calibration, report, network_tag)
