"""The reproduction pipeline (SPEC section 3) in one call: train a network, calibrate P(t), compare.

Each stage writes into one directory and is resumable: training continues from its checkpoint, calibration is
skipped when its JSON exists, and the comparison recomputes no finished seed. So a killed `elsfast reproduce`
run, started again with the same command, continues where it stopped.

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
from ..common.fileio import atomic_write, check_replaceable
from ..machine import ScoreMachine
from ..nets.train import TrainConfig, load_checkpoint, train
from ..plots.style import matplotlib_missing
from .calibrate import CalibrationResult, calibrate
from .compare import compare

__all__ = ["PRESETS", "TABLE1", "Preset", "describe_cost", "preset_cost", "reproduce"]

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


def _cpu_preset(train: TrainConfig, notes: str, **preset) -> Preset:
    """A reduced-scale preset for a 2-core CPU: P(t) calibrated over 3..13 on 6 seeds, compared on 30 seeds."""
    return Preset(
        train=train, sizes=(3, 5, 7, 9, 11, 13), calibration_seeds=6, comparison_seeds=30, notes=notes, **preset
    )


# the network of the CPU presets: a 64-channel conditional ResNet (the paper's 17x17 receptive field, a quarter of
# its width), zero padding, at a learning rate for a short run
_SMALL_RESNET = dict(
    arch="resnet", channels=64, blocks=6, padding="zeros", conditional=True, lr=5e-4, checkpoint_every=200
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
        TrainConfig(
            dataset="faces",
            limit=2000,
            arch="unet",
            channels=[32, 64, 128],
            blocks=1,
            padding="zeros",
            conditional=False,
            lr=5e-4,
            max_steps=1200,
            checkpoint_every=200,
        ),
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
        notes=(
            f"the paper's {_dataset} {_arch.upper() if _arch == 'unet' else 'ResNet'} ({_padding}"
            f"{', class-conditional' if _conditional else ''}) configuration, Table 1: {_machine.upper()} r = {_r}; "
            "needs a GPU"
        ),
    )


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
        "calibration_evaluations": preset.calibration_seeds * evaluations * len(preset.sizes),
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
) -> dict:
    """Run (or resume) a reproduction into `out_dir`: `network.pt`, `calibration.json`/`.png`, `report/`
    (see `elsfast.research.compare`) and `reproduction.json` with the headline numbers. Returns that summary.

    `train_minutes` and `train_steps` replace the preset's training time limit and step count (a total from step
    0; a run that stopped earlier, or a `network.pt` copied from another run of the same preset, trains on to it).
    The calibration and the comparison name the network's training step: after the network has trained on, the
    old `calibration.json` and `report/` are refused (ValueError saying what to remove), never mixed with it.

    `grid` is the comparison's step grid, the same for the network and the machines (`compare`'s `grid`:
    "machine", noise at t = (n-1)/n, or "network", noise at t = 1 as in the authors' network sampler)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        name, preset = preset, PRESETS[preset]
    else:
        name = "custom"
    if train_steps is not None and train_steps < 1:
        raise ValueError(f"train_steps must be >= 1, got {train_steps}")
    out = Path(out_dir)
    for file in ("calibration.png", "reproduction.json"):  # refused now rather than after hours of work
        check_replaceable(out / file)
    out.mkdir(parents=True, exist_ok=True)
    config = replace(
        preset.train,
        out=str(out / "network.pt"),
        root=None if root is None else str(root),
        device=device,
        max_minutes=train_minutes if train_minutes is not None else preset.train.max_minutes,
        max_steps=train_steps if train_steps is not None else preset.train.max_steps,
    )
    seeds = comparison_seeds if comparison_seeds is not None else preset.comparison_seeds
    preset = replace(preset, train=config, comparison_seeds=seeds)  # what this run does, for its cost
    data = datasets.load(config.dataset, root=config.root, pad_to=config.pad_to, limit=config.limit)
    cost = preset_cost(preset, data.images, data.labels)
    log.info("elsfast reproduce %s: %s", name, describe_cost(cost))
    if progress:
        print(f"elsfast reproduce {name}: {describe_cost(cost)}", file=sys.stderr)
    trained = train(config, resume=True, progress=progress, images=data.images, labels=data.labels)
    model, model_config, _ = load_checkpoint(config.out, device=device)
    labels = data.labels if config.conditional else None
    padding = model_config["model"]["padding"]

    network_tag = f"{config.out} at step {trained['steps']}"
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
        machine = ScoreMachine(data.images, labels, machine=preset.calibrate_machine, padding=padding, device=device)
        calibration = calibrate(
            model,
            machine,
            sizes=preset.sizes,
            seeds=range(preset.calibration_seeds),
            steps=preset.steps,
            conditional=config.conditional,
            progress=progress,
        )
        calibration.network = network_tag
        calibration.to_json(calibration_path)
    if not (out / "calibration.png").exists():  # drawn now, or on a later run if matplotlib was missing then
        skipped = matplotlib_missing()
        if skipped is None:
            calibration.plot(out / "calibration.png")
        else:
            warnings.warn(f"calibration.png skipped (calibration.json written): {skipped}", stacklevel=2)
            if progress:
                print(f"elsfast reproduce {name}: calibration.png skipped: {skipped}", file=sys.stderr)

    report = compare(
        model,
        data.images,
        labels,
        out_dir=out / "report",
        scales=calibration,
        seeds=range(1000, 1000 + seeds),  # disjoint from the calibration seeds
        steps=preset.steps,
        conditional=config.conditional,
        machines=preset.machines,
        padding=padding,
        network=network_tag,
        progress=progress,
        grid=grid,
    )
    summary = {
        "preset": name,
        "notes": preset.notes,
        "paper_r": preset.paper_r,
        "calibrated_machine": preset.calibrate_machine,
        "cost": cost,
        "training": {k: trained[k] for k in ("total_steps", "steps", "loss", "total_seconds", "finished")},
        "scales": calibration.scales,
        "grid": grid,
        "summary": report["summary"],
        "files": {"network": config.out, "calibration": str(calibration_path), **report["files"]},
        "torch": torch.__version__,
        "device": device or "cpu",
    }
    text = json.dumps(summary, indent=2, default=str).encode()
    atomic_write(out / "reproduction.json", lambda f: f.write(text))
    return summary
