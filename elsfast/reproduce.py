"""The reproduction pipeline (SPEC section 3) in one call: train a network, calibrate P(t), compare.

Each stage writes into one directory and is resumable: training continues from its checkpoint, calibration is
skipped when its JSON exists, and the comparison recomputes no finished seed. So a killed `elsfast reproduce`
run, started again with the same command, continues where it stopped.

Presets:

- `mnist-small` (2-core CPU, well under an hour): a conditional ResNet (64 channels, 6 residual blocks: the
  paper's 17x17 receptive field, a quarter of its width) with zero padding, trained for `train_minutes` (default
  20) on the 2,000 embedded MNIST digits (28x28) at learning rate 5e-4 (the paper's 1e-4 is for 300 epochs);
  ELS calibrated over P in 3..13 on 6 seeds; ELS, LS and IS compared with the network on 30 seeds, 20 steps.
- `mnist-paper`: the paper's configuration for MNIST ResNet (zeros): full MNIST padded to 32x32, 256 channels,
  batch 128, lr 1e-4, 300 epochs, unconditional; P in 3..17 on 10 seeds; 100 seeds. Needs a GPU and the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import datasets
from .calibrate import CalibrationResult, calibrate
from .compare import compare
from .fileio import atomic_write, check_replaceable
from .machine import ScoreMachine
from .train import TrainConfig, load_checkpoint, train

__all__ = ["PRESETS", "Preset", "reproduce"]


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


PRESETS: dict[str, Preset] = {
    "mnist-small": Preset(
        train=TrainConfig(
            dataset="mnist-embedded",
            arch="resnet",
            channels=64,
            blocks=6,
            padding="zeros",
            conditional=True,
            lr=5e-4,
            max_minutes=20,
            checkpoint_every=200,
        ),
        sizes=(3, 5, 7, 9, 11, 13),
        calibration_seeds=6,
        comparison_seeds=30,
        notes="reduced scale for a 2-core CPU: 64-channel conditional ResNet, 2,000 MNIST digits, time-limited",
    ),
    "mnist-paper": Preset(
        train=TrainConfig(dataset="mnist", pad_to=32, arch="resnet", padding="zeros", conditional=False),
        sizes=(3, 5, 7, 9, 11, 13, 15, 17),
        calibration_seeds=10,
        comparison_seeds=100,
        notes="the paper's MNIST ResNet (zeros) configuration (SPEC section 3); needs a GPU",
    ),
}


def reproduce(
    preset: str | Preset,
    out_dir: str | Path,
    *,
    root: str | Path | None = None,
    device: str | None = None,
    train_minutes: float | None = None,
    comparison_seeds: int | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) a reproduction into `out_dir`: `network.pt`, `calibration.json`/`.png`, `report/`
    (see `elsfast.compare`) and `reproduction.json` with the headline numbers. Returns that summary."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        name, preset = preset, PRESETS[preset]
    else:
        name = "custom"
    out = Path(out_dir)
    for name in ("calibration.png", "reproduction.json"):  # refused now rather than after hours of work
        check_replaceable(out / name)
    out.mkdir(parents=True, exist_ok=True)
    config = replace(
        preset.train,
        out=str(out / "network.pt"),
        root=None if root is None else str(root),
        device=device,
        max_minutes=train_minutes if train_minutes is not None else preset.train.max_minutes,
    )
    data = datasets.load(config.dataset, root=config.root, pad_to=config.pad_to, limit=config.limit)
    trained = train(config, resume=True, progress=progress, images=data.images, labels=data.labels)
    model, model_config, _ = load_checkpoint(config.out, device=device)
    labels = data.labels if config.conditional else None
    padding = model_config["model"]["padding"]

    calibration_path = out / "calibration.json"
    if calibration_path.exists():
        calibration = CalibrationResult.from_json(calibration_path)
    else:
        machine = ScoreMachine(data.images, labels, machine="els", padding=padding, device=device)
        calibration = calibrate(
            model,
            machine,
            sizes=preset.sizes,
            seeds=range(preset.calibration_seeds),
            steps=preset.steps,
            conditional=config.conditional,
            progress=progress,
        )
        calibration.plot(out / "calibration.png")
        calibration.to_json(calibration_path)

    seeds = comparison_seeds if comparison_seeds is not None else preset.comparison_seeds
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
        network=str(config.out),
        progress=progress,
    )
    summary = {
        "preset": name,
        "notes": preset.notes,
        "training": {k: trained[k] for k in ("total_steps", "steps", "loss", "total_seconds", "finished")},
        "scales": calibration.scales,
        "summary": report["summary"],
        "files": {"network": config.out, "calibration": str(calibration_path), **report["files"]},
        "torch": torch.__version__,
        "device": device or "cpu",
    }
    text = json.dumps(summary, indent=2, default=str).encode()
    atomic_write(out / "reproduction.json", lambda f: f.write(text))
    return summary
