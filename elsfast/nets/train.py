"""Training the networks of the reproduction (SPEC section 3, paper App. C), resumable step for step.

Objective: epsilon-MSE, E || eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) - eps ||^2 with
t ~ U{0, ..., 999} / 1000 on the legacy cosine schedule (`elsfast.common.schedules.abar_cosine_legacy`) and
eps ~ N(0, I). Adam, lr 1e-4, no weight decay, batch 128, learning rate times 0.999965 after every step,
300 epochs, no EMA, no augmentation. The data is read once into memory as float in [-1, 1].

Every random draw (the batch order of each epoch, then each step's t and eps) comes from one explicit CPU
`torch.Generator` seeded with `seed`; the initial weights come from `torch.manual_seed(seed)` inside a forked
RNG. A checkpoint stores that generator's state and the position in the current epoch (with its permutation),
so `train(config, resume=True)` continues exactly where the checkpoint stopped: a run stopped by `max_steps`
or `max_minutes` and resumed ends with the same parameters as one uninterrupted run (bit for bit on the same
device and thread count).

Checkpoint (a `torch.save` dict, readable with `torch.load(path, weights_only=True)`):

    format "elsfast-checkpoint", version 1,
    config {"model": model_config(model), "train": dataclasses.asdict(TrainConfig)},
    model (state_dict), optimizer, scheduler (state dicts), rng {"generator": uint8 tensor, "cuda": ... | None},
    step, total_steps, epoch, batch (index in the epoch), perm (the epoch's order, or None at a boundary),
    loss (mean of the last steps), seconds (training time summed over resumed runs),
    data {"n", "shape", "sha256"} (`training_set_sha256` of the float training images and labels, checked on resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..common.checks import check_device, check_pixel_range
from ..common.fileio import atomic_write, describe_file
from ..common.fingerprint import training_set_sha256
from ..common.pixels import to_float
from ..common.schedules import get_schedule
from .models import build_model, model_config

__all__ = [
    "CHECKPOINT_FORMAT",
    "TIMESTEPS",
    "TrainConfig",
    "abar_table",
    "diffusion_loss",
    "load_checkpoint",
    "train",
]

CHECKPOINT_FORMAT = "elsfast-checkpoint"
CHECKPOINT_VERSION = 1
TIMESTEPS = 1000
"""t is drawn from {0, 1, ..., TIMESTEPS - 1} / TIMESTEPS."""

# Settings that must agree between a checkpoint and the config that resumes it. The model (its plain config)
# and the training images (a SHA-256 of the float tensor) are compared too; everything else (max_steps, epochs,
# max_minutes, device, checkpoint_every, bf16, ...) may change between runs.
_RESUME_FIXED = ("batch_size", "lr", "lr_decay", "seed", "schedule")


@dataclass
class TrainConfig:
    """Everything a training run depends on; the defaults are the paper's (App. C).

    - dataset, root, pad_to, limit: passed to `elsfast.datasets.load(dataset, "train", root, pad_to=, limit=)`
      (ignored except `limit` when `train` is given `images`). The paper pads MNIST-type data to 32x32.
    - arch "resnet" | "unet"; channels: ResNet width (int, 256) or UNet widths per scale (list, [64, 128, 256]);
      None picks the architecture's default. blocks: ResNet residual layers (6) / UNet blocks per level (1).
    - padding "zeros" | "circular"; conditional: class-conditional on the dataset's labels (num_classes from the
      dataset, or labels.max() + 1, unless given).
    - batch_size 128, lr 1e-4 (Adam, no weight decay), lr_decay 0.999965 per step, epochs 300; the run stops at
      epochs * ceil(N / batch_size) steps, or earlier at max_steps (a total, counted from step 0) or after
      max_minutes of this call; it then writes the checkpoint and can be resumed.
    - seed: initial weights and every random draw. checkpoint_every (steps; 0 = only at the end), out: the
      checkpoint file. device: None (or "auto") = CUDA if available, else CPU. bf16: bfloat16 autocast (CUDA
      only; ignored on the CPU). compile: torch.compile the model (CUDA only).
    - schedule: the noise schedule, "cosine-legacy" as in the paper. threads: torch intra-op CPU threads during
      the run (None = leave torch's setting; 1 avoids OpenMP spin contention on a busy machine for small models).
    """

    dataset: str = "mnist"
    root: str | None = None
    pad_to: int | None = None
    limit: int | None = None
    arch: str = "resnet"
    channels: int | list[int] | None = None
    blocks: int | None = None
    padding: str = "zeros"
    conditional: bool = False
    num_classes: int | None = None
    batch_size: int = 128
    lr: float = 1e-4
    lr_decay: float = 0.999965
    epochs: int = 300
    max_steps: int | None = None
    max_minutes: float | None = None
    seed: int = 0
    checkpoint_every: int = 1000
    out: str | None = None
    device: str | None = None
    bf16: bool = False
    compile: bool = False
    schedule: str = "cosine-legacy"
    threads: int | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["channels"], tuple):
            d["channels"] = list(d["channels"])
        return d


def abar_table(schedule: str = "cosine-legacy", timesteps: int = TIMESTEPS) -> torch.Tensor:
    """abar at t = k / timesteps for k = 0 .. timesteps - 1, float64 `[timesteps]`."""
    abar_of = get_schedule(schedule)
    return torch.tensor([abar_of(k / timesteps) for k in range(timesteps)], dtype=torch.float64)


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    k: torch.Tensor,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eps-MSE (a scalar, mean over all elements) at integer steps `k` `[B]` (t = k / 1000).

    x0, noise `[B, C, H, W]`; `table` = `abar_table()` (the legacy cosine one if None).
    """
    table = abar_table() if table is None else table
    abar = table.to(x0.device)[k.to(x0.device)].to(torch.float32)[:, None, None, None]
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    t = k.to(x0.device, torch.float32) / TIMESTEPS
    pred = model(xt, t, labels)
    return torch.mean((pred.float() - noise.float()) ** 2)


# ------------------------------------------------------------------------------------------------------------
# checkpoints


def _bad(path, why: str) -> ValueError:
    return ValueError(f"{path} is not a usable elsfast checkpoint: {why}")


def _read_checkpoint(path: str | Path, device=None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device or "cpu", weights_only=True)
    except Exception as err:  # truncated zip, random bytes, foreign pickles all land here
        raise _bad(path, f"the file is truncated, corrupted or not a torch checkpoint ({type(err).__name__})") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise _bad(path, "it was not written by elsfast.nets.train (no 'format': 'elsfast-checkpoint' entry)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise _bad(path, f"format version {ckpt.get('version')!r} is not the supported {CHECKPOINT_VERSION}")
    missing = [k for k in ("config", "model", "step") if k not in ckpt]
    if missing:
        raise _bad(path, f"entries {missing} are missing")
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, dict, dict]:
    """Load a checkpoint written by `train`: `(model, config, checkpoint)`.

    `model` is rebuilt from the stored plain config, holds the trained weights, is on `device` (default CPU)
    and in eval mode. `config` is the stored train config (`TrainConfig` as a dict, e.g. `config["dataset"]`,
    `config["pad_to"]`, `config["schedule"]`) plus `config["model"]`, the model config (`arch`, `padding`,
    `num_classes`, ...). `checkpoint` is the whole stored dict (see the module docstring).
    Raises FileNotFoundError for a missing file and ValueError, naming the file, for a truncated or corrupted
    one or one that is not an elsfast checkpoint.
    """
    ckpt = _read_checkpoint(path, "cpu")
    try:
        model = build_model(ckpt["config"]["model"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _bad(path, f"its weights do not fit its model config ({err})") from err
    model = model.to(device or "cpu").eval()
    config = {**ckpt["config"].get("train", {}), "model": dict(ckpt["config"]["model"])}
    return model, config, ckpt


def _save(path: str | Path, state: dict) -> None:
    # `train` decided up front whether the file may be replaced (resume, overwrite, or no file yet)
    atomic_write(path, lambda f: torch.save(state, f), replace="any")


# ------------------------------------------------------------------------------------------------------------
# training


def _load_data(config: TrainConfig, images, labels) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    num_classes = None
    if images is None:
        from .. import datasets

        data = datasets.load(config.dataset, "train", config.root, pad_to=config.pad_to, limit=config.limit)
        images, labels, num_classes = data.images, data.labels, data.num_classes
    elif config.limit is not None:
        images = images[: config.limit]
        labels = None if labels is None else labels[: config.limit]
    images = torch.as_tensor(images)
    check_pixel_range(images, "training images")
    images = to_float(images).contiguous()
    if images.dim() != 4:
        raise ValueError(f"training images must have shape [N, C, H, W], got {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("no training images")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if labels.numel() != images.shape[0]:
            raise ValueError(f"{images.shape[0]} training images but {labels.numel()} labels")
    if not config.conditional:
        return images, None, None
    if labels is None:
        raise ValueError(f"conditional training needs labels, and dataset {config.dataset!r} has none")
    num_classes = config.num_classes or num_classes or int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    return images, labels, num_classes


def _fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> dict:
    digest = training_set_sha256(images, labels)
    return {"n": int(images.shape[0]), "shape": list(images.shape[1:]), "sha256": digest}


def _same_data(saved: dict | None, info: dict, images: torch.Tensor) -> bool:
    """Whether a checkpoint's `data` record names these training images. Checkpoints written before the one
    training-set hash recorded the SHA-256 of the float images' bytes alone; they are still recognised."""
    if saved == info:
        return True
    legacy = {**info, "sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()}
    return saved == legacy


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict:
    """Train a network as configured and write it to `config.out` (atomically, every `checkpoint_every` steps
    and at the end).

    `images` (uint8 or float in [-1, 1], `[N, C, H, W]`) and `labels` (`[N]`) replace the dataset named in the
    config. With `resume=True` and an existing `config.out`, training continues from that checkpoint exactly (its
    model, data and optimisation settings must match the config: ValueError otherwise); without the file it
    starts from scratch. With `resume=False` an existing `config.out` raises FileExistsError (naming it and what
    it looks like) unless `overwrite=True`, which replaces it; `resume` and `overwrite` exclude each other.

    Returns `{"steps", "total_steps", "epoch", "loss", "seconds", "total_seconds", "finished", "checkpoint"}`:
    steps done so far (all runs), the step count of the full schedule (epochs or max_steps), epochs completed,
    the mean loss of the last (up to 100) steps (the stored one if this call ran none), this call's wall time, the
    training time over all runs, whether the schedule is complete, and the checkpoint path.
    """
    if config.out is None:
        raise ValueError("TrainConfig.out (the checkpoint file) is required")
    out = Path(config.out)
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True exclude each other: continue the checkpoint or replace it")
    if out.is_dir():
        raise IsADirectoryError(f"the checkpoint path {out} is a directory")
    if out.exists() and not resume and not overwrite:
        raise FileExistsError(
            f"{out} already exists (it looks like {describe_file(out)}): pass resume=True (--resume) to continue "
            "it, or overwrite=True (--overwrite) to replace it"
        )
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}")
    device = check_device("auto" if config.device is None else config.device)
    x_all, y_all, num_classes = _load_data(config, images, labels)
    data_info = _fingerprint(x_all, y_all)
    n = x_all.shape[0]
    per_epoch = math.ceil(n / config.batch_size)
    total = config.epochs * per_epoch
    if config.max_steps is not None:
        total = min(total, int(config.max_steps))

    mconf = {
        "arch": config.arch,
        "in_channels": int(x_all.shape[1]),
        "channels": config.channels,
        "blocks": config.blocks,
        "padding": config.padding,
        "num_classes": num_classes,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(mconf)
    mconf = model_config(model)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay)
    gen = torch.Generator().manual_seed(config.seed)
    step, epoch, batch, perm, past_seconds, resumed_loss = 0, 0, 0, None, 0.0, None

    if resume and out.exists():
        ckpt = _read_checkpoint(out, "cpu")
        old = ckpt["config"].get("train", {})
        diff = [k for k in _RESUME_FIXED if k in old and old[k] != getattr(config, k)]
        if diff:
            pairs = ", ".join(f"{k}: {old[k]!r} != {getattr(config, k)!r}" for k in diff)
            raise ValueError(f"cannot resume from {out}: the config differs ({pairs})")
        if ckpt["config"]["model"] != mconf:
            raise ValueError(f"cannot resume from {out}: its model {ckpt['config']['model']} is not {mconf}")
        if not _same_data(ckpt.get("data"), data_info, x_all):
            raise ValueError(f"cannot resume from {out}: it was trained on different images ({ckpt.get('data')})")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["rng"]["generator"])
        if ckpt["rng"].get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        step, epoch, batch, perm = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch"]), ckpt["perm"]
        past_seconds = float(ckpt.get("seconds", 0.0))
        resumed_loss = ckpt.get("loss")

    x_dev = x_all.to(device)
    y_dev = None if y_all is None else y_all.to(device)
    table = abar_table(config.schedule).to(device)
    use_bf16 = bool(config.bf16) and device.type == "cuda"
    net = torch.compile(model) if (config.compile and device.type == "cuda") else model
    model.train()

    t0 = time.monotonic()
    recent: list[torch.Tensor] = []
    last_loss = resumed_loss

    def checkpoint() -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": {"model": mconf, "train": config.to_dict()},
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": _to_cpu(opt.state_dict()),
            "scheduler": sched.state_dict(),
            "rng": {
                "generator": gen.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "step": step,
            "total_steps": total,
            "epoch": epoch,
            "batch": batch,
            "perm": perm,
            "loss": last_loss,
            "seconds": past_seconds + (time.monotonic() - t0),
            "data": data_info,
        }
        _save(out, state)

    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    bar = tqdm(total=total, initial=min(step, total), desc="training", disable=not progress, dynamic_ncols=True)
    try:
        while step < total:
            if config.max_minutes is not None and time.monotonic() - t0 > 60.0 * config.max_minutes:
                break
            if batch == 0 or perm is None:
                perm = torch.randperm(n, generator=gen)
            idx = perm[batch * config.batch_size : (batch + 1) * config.batch_size]
            k = torch.randint(0, TIMESTEPS, (idx.numel(),), generator=gen)
            noise = torch.randn((idx.numel(), *x_all.shape[1:]), generator=gen)
            idx_dev = idx.to(device)
            x0 = x_dev[idx_dev]
            yb = None if y_dev is None else y_dev[idx_dev]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                loss = diffusion_loss(net, x0, k.to(device), noise.to(device), yb, table=table)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            batch += 1
            if batch == per_epoch:
                batch, epoch, perm = 0, epoch + 1, None
            recent.append(loss.detach())
            if len(recent) >= 100 or step == total or step % 10 == 0:
                recent = recent[-100:]
                last_loss = float(torch.stack(recent).mean())
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                checkpoint()
    finally:
        bar.close()
        torch.set_num_threads(threads)
    if recent:
        last_loss = float(torch.stack(recent[-100:]).mean())
    checkpoint()
    seconds = time.monotonic() - t0
    return {
        "steps": step,
        "total_steps": total,
        "epoch": epoch,
        "loss": last_loss,
        "seconds": seconds,
        "total_seconds": past_seconds + seconds,
        "finished": step >= total,
        "checkpoint": str(out),
    }


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
