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
    loss (mean of the last steps), seconds (training time summed over resumed runs), stopped (why the run that
    wrote it ended: "finished", "time limit", "interrupted"; None mid-run),
    data {"n", "shape", "sha256"} (`training_set_sha256` of the float training images and labels, checked on resume).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..common.checks import check_device, check_pixel_range
from ..common.fileio import atomic_write, check_replaceable, check_writable, describe_file
from ..common.fingerprint import training_set_sha256
from ..common.pixels import to_float
from ..common.schedules import get_schedule
from .models import build_model, model_config

__all__ = [
    "CHECKPOINT_FORMAT",
    "TIMESTEPS",
    "TrainConfig",
    "abar_table",
    "checkpoint_summary",
    "diffusion_loss",
    "estimate_training_seconds",
    "load_checkpoint",
    "schedule_steps",
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
    - arch "resnet" | "unet" | "unet-sa" (the UNet with self-attention at 16x16 and 8x8 on 32x32 images,
      `elsfast.nets.models`); channels: ResNet width (int, 256) or UNet widths per scale (list, [64, 128, 256]);
      None picks the architecture's default. blocks: ResNet residual layers (6) / UNet blocks per level (1).
    - padding "zeros" | "circular"; conditional: class-conditional on the dataset's labels (num_classes from the
      dataset, or labels.max() + 1, unless given).
    - batch_size 128, lr 1e-4 (Adam, no weight decay), lr_decay 0.999965 per step, epochs 300; the run stops at
      epochs * ceil(N / batch_size) steps, or earlier at max_steps (a total, counted from step 0) or after
      max_minutes of this call; it then writes the checkpoint and can be resumed.
    - seed: initial weights and every random draw. checkpoint_every (steps; 0 = only at the end) and
      checkpoint_minutes (wall time since the last checkpoint; 0 = off): when a checkpoint is written during the
      run, besides the end and SIGINT/SIGTERM. out: the checkpoint file. device: None (or "auto") = CUDA if
      available, else CPU. bf16: bfloat16 autocast (CUDA only; ignored on the CPU). compile: torch.compile the
      model (CUDA only).
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
    checkpoint_minutes: float = 5.0
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
    # a network's training run replaces a network checkpoint only (`train` checked resume/overwrite up front)
    atomic_write(path, lambda f: torch.save(state, f), kind="network")


def checkpoint_summary(path: str | Path) -> dict:
    """What the training checkpoint at `path` records of its run, without building the model: `{"steps",
    "total_steps", "epoch", "loss", "total_seconds", "finished", "stopped", "checkpoint"}` (`stopped`: why its
    last run ended: "finished", "time limit", "interrupted", or None for a checkpoint written during a run)."""
    ckpt = _read_checkpoint(path, "cpu")
    step, total = int(ckpt["step"]), int(ckpt.get("total_steps", ckpt["step"]))
    return {
        "steps": step,
        "total_steps": total,
        "epoch": int(ckpt.get("epoch", 0)),
        "loss": ckpt.get("loss"),
        "total_seconds": float(ckpt.get("seconds", 0.0)),
        "finished": step >= total,
        "stopped": ckpt.get("stopped"),
        "checkpoint": str(path),
    }


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


def schedule_steps(config: TrainConfig, n: int) -> int:
    """The step count of `config`'s full schedule on `n` training images: epochs x ceil(n / batch_size), or
    `max_steps` when that is smaller."""
    total = config.epochs * math.ceil(n / config.batch_size)
    return total if config.max_steps is None else min(total, int(config.max_steps))


def _check_request(config: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """Validate: the checkpoint path `config.out` and what may happen to a file there, before any work (its folder
    must be writable; an existing file must be an elsfast network checkpoint, continued with `resume` or
    replaced with `overwrite`; anything else is refused and kept)."""
    if config.out is None:
        raise ValueError("TrainConfig.out (the checkpoint file) is required")
    out = Path(config.out)
    if resume and overwrite:
        raise ValueError("resume=True and overwrite=True exclude each other: continue the checkpoint or replace it")
    if out.is_dir():
        raise IsADirectoryError(f"the checkpoint path {out} is a directory")
    if resume and out.exists():
        check_writable(out.parent)  # the file itself is read (and refused unless it is a checkpoint) by `_resume`
    else:
        check_replaceable(out, "network")  # a writable folder; no file, or a network checkpoint
    if out.exists() and not resume and not overwrite:
        raise FileExistsError(
            f"{out} already exists (it looks like {describe_file(out)}): pass resume=True (--resume) to continue "
            "it, or overwrite=True (--overwrite) to replace it"
        )
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}")
    if config.checkpoint_minutes < 0:
        raise ValueError(f"checkpoint_minutes must be >= 0, got {config.checkpoint_minutes}")
    return out


@dataclass
class _Run:
    """One training run's model, optimiser, random state and position (what a checkpoint holds)."""

    config: TrainConfig
    out: Path
    device: torch.device
    model: nn.Module
    mconf: dict
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    images: torch.Tensor
    labels: torch.Tensor | None
    data_info: dict
    total: int
    step: int = 0
    epoch: int = 0
    batch: int = 0
    perm: torch.Tensor | None = None
    past_seconds: float = 0.0
    loss: float | None = None
    stopped: str | None = None
    saved_stopped: str | None = None  # the `stopped` entry of the checkpoint resumed from
    t0: float = 0.0

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.images.shape[0] / self.config.batch_size)

    def checkpoint(self) -> None:
        """Write the run's state to `out`, atomically."""
        device = self.device
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": {"model": self.mconf, "train": self.config.to_dict()},
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.opt.state_dict()),
            "scheduler": self.sched.state_dict(),
            "rng": {
                "generator": self.gen.get_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "step": self.step,
            "total_steps": self.total,
            "epoch": self.epoch,
            "batch": self.batch,
            "perm": self.perm,
            "loss": self.loss,
            "seconds": self.past_seconds + (time.monotonic() - self.t0),
            "stopped": self.stopped,
            "data": self.data_info,
        }
        _save(self.out, state)


def _configure(config: TrainConfig, out: Path, device: torch.device, images, labels) -> _Run:
    """Configure: the training data, the model (initial weights from `config.seed`), optimiser and schedule."""
    x_all, y_all, num_classes = _load_data(config, images, labels)
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
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=0.0)
    return _Run(
        config=config,
        out=out,
        device=device,
        model=model,
        mconf=model_config(model),
        opt=opt,
        sched=torch.optim.lr_scheduler.ExponentialLR(opt, gamma=config.lr_decay),
        gen=torch.Generator().manual_seed(config.seed),
        images=x_all,
        labels=y_all,
        data_info=_fingerprint(x_all, y_all),
        total=schedule_steps(config, x_all.shape[0]),
    )


def _resume(run: _Run) -> None:
    """Resume: load the checkpoint at `run.out` into the run, after checking it is a run of the same setup."""
    out, config = run.out, run.config
    ckpt = _read_checkpoint(out, "cpu")
    old = ckpt["config"].get("train", {})
    diff = [k for k in _RESUME_FIXED if k in old and old[k] != getattr(config, k)]
    if diff:
        pairs = ", ".join(f"{k}: {old[k]!r} != {getattr(config, k)!r}" for k in diff)
        raise ValueError(f"cannot resume from {out}: the config differs ({pairs})")
    if ckpt["config"]["model"] != run.mconf:
        raise ValueError(f"cannot resume from {out}: its model {ckpt['config']['model']} is not {run.mconf}")
    if not _same_data(ckpt.get("data"), run.data_info, run.images):
        raise ValueError(f"cannot resume from {out}: it was trained on different images ({ckpt.get('data')})")
    run.model.load_state_dict(ckpt["model"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    run.gen.set_state(ckpt["rng"]["generator"])
    if ckpt["rng"].get("cuda") is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], run.device)
    run.step, run.epoch, run.batch, run.perm = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch"]), ckpt["perm"]
    run.past_seconds = float(ckpt.get("seconds", 0.0))
    run.loss = ckpt.get("loss")
    run.saved_stopped = ckpt.get("stopped")


@contextlib.contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM during the training loop are recorded (in the list yielded) instead of acting at once,
    so the loop can stop between two steps and write a checkpoint first; the previous handlers are back on exit.
    A second Ctrl-C acts at once (KeyboardInterrupt: the steps since the last checkpoint are lost). Outside the
    main thread signals are left as they are (the list stays empty)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def defer(signum, frame) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        print(
            "\nelsfast: stopping after this step to write the training checkpoint (Ctrl-C again: stop at once)",
            file=sys.stderr,
            flush=True,
        )

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: a handler not installed from Python, left alone
            previous[sig] = signal.signal(sig, defer)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Bar:
    """The progress bar of a run: steps, and with a time limit the bound that will stop the run first (the
    limit, or the schedule's last step) and when."""

    def __init__(self, run: _Run, progress: bool):
        minutes = run.config.max_minutes
        desc = "training" if minutes is None else f"training (time limit {minutes:g} min)"
        self.run, self.minutes = run, minutes
        self.first = run.step
        self.bar = tqdm(total=run.total, initial=min(run.step, run.total), desc=desc, disable=not progress)

    def update(self) -> None:
        run, bar = self.run, self.bar
        bar.update(1)
        if run.step % 10 and run.step != run.total:
            return
        postfix = {"loss": f"{run.loss:.4f}" if run.loss is not None else "-"}
        postfix["lr"] = f"{run.sched.get_last_lr()[0]:.2e}"
        if self.minutes is not None:
            elapsed = time.monotonic() - run.t0
            rate = (run.step - self.first) / max(elapsed, 1e-9)
            left = max(60.0 * self.minutes - elapsed, 0.0)
            reachable = run.step + int(rate * left)
            if reachable < run.total:  # the time limit stops it first: count to the step it will reach
                bar.total = max(reachable, run.step + 10)
                postfix["stops"] = f"time limit in {tqdm.format_interval(left)}"
            else:
                bar.total = run.total
                to_end = (run.total - run.step) / max(rate, 1e-9)
                postfix["stops"] = f"step {run.total:,} in {tqdm.format_interval(to_end)}"
        bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.run.stopped == "time limit":  # it ends here: a full bar
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()


def _loop(run: _Run, progress: bool) -> int:
    """Loop: train until the schedule's end, the time limit, or SIGINT/SIGTERM (then stop between two steps).
    Writes a checkpoint every `checkpoint_every` steps and every `checkpoint_minutes` of wall time. Returns the
    signal that stopped it (0 if none); `run.stopped` says why it stopped."""
    config, device = run.config, run.device
    x_dev = run.images.to(device)
    y_dev = None if run.labels is None else run.labels.to(device)
    table = abar_table(config.schedule).to(device)
    use_bf16 = bool(config.bf16) and device.type == "cuda"
    net = torch.compile(run.model) if (config.compile and device.type == "cuda") else run.model
    run.model.train()
    n, per_epoch = run.images.shape[0], run.per_epoch
    recent: list[torch.Tensor] = []
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    run.t0 = last_checkpoint = time.monotonic()
    bar = _Bar(run, progress)
    try:
        with _deferred_signals() as received:
            while run.step < run.total:
                if received:
                    run.stopped = "interrupted"
                    break
                if config.max_minutes is not None and time.monotonic() - run.t0 > 60.0 * config.max_minutes:
                    run.stopped = "time limit"
                    break
                if run.batch == 0 or run.perm is None:
                    run.perm = torch.randperm(n, generator=run.gen)
                idx = run.perm[run.batch * config.batch_size : (run.batch + 1) * config.batch_size]
                k = torch.randint(0, TIMESTEPS, (idx.numel(),), generator=run.gen)
                noise = torch.randn((idx.numel(), *run.images.shape[1:]), generator=run.gen)
                idx_dev = idx.to(device)
                yb = None if y_dev is None else y_dev[idx_dev]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    loss = diffusion_loss(net, x_dev[idx_dev], k.to(device), noise.to(device), yb, table=table)
                run.opt.zero_grad(set_to_none=True)
                loss.backward()
                run.opt.step()
                run.sched.step()
                run.step += 1
                run.batch += 1
                if run.batch == per_epoch:
                    run.batch, run.epoch, run.perm = 0, run.epoch + 1, None
                recent.append(loss.detach())
                if len(recent) >= 100 or run.step == run.total or run.step % 10 == 0:
                    recent = recent[-100:]
                    run.loss = float(torch.stack(recent).mean())
                bar.update()
                every, minutes = config.checkpoint_every, config.checkpoint_minutes
                due = (every and run.step % every == 0) or (
                    minutes and time.monotonic() - last_checkpoint > 60 * minutes
                )
                if due and run.step < run.total:
                    run.checkpoint()
                    last_checkpoint = time.monotonic()
            else:
                run.stopped = "finished"
    finally:
        bar.close()
        torch.set_num_threads(threads)
    if recent:
        run.loss = float(torch.stack(recent[-100:]).mean())
    return received[0] if received else 0


def _report(run: _Run, seconds: float) -> dict:
    """Report: the summary `train` returns."""
    return {
        "steps": run.step,
        "total_steps": run.total,
        "epoch": run.epoch,
        "loss": run.loss,
        "seconds": seconds,
        "total_seconds": run.past_seconds + seconds,
        "finished": run.step >= run.total,
        "stopped": run.stopped,
        "checkpoint": str(run.out),
    }


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> dict:
    """Train a network as configured and write it to `config.out` (atomically, every `checkpoint_every` steps,
    every `checkpoint_minutes` of wall time, on SIGINT/SIGTERM and at the end).

    `images` (uint8 or float in [-1, 1], `[N, C, H, W]`) and `labels` (`[N]`) replace the dataset named in the
    config. With `resume=True` and an existing `config.out`, training continues from that checkpoint exactly (its
    model, data and optimisation settings must match the config: ValueError otherwise); without the file it
    starts from scratch. With `resume=False` an existing `config.out` raises FileExistsError (naming it and what
    it looks like) unless it is an elsfast network checkpoint and `overwrite=True`, which replaces it; any other
    file is never replaced. `resume` and `overwrite` exclude each other. The folder of `config.out` is checked
    to be writable before the data is loaded.

    SIGINT (Ctrl-C) or SIGTERM during the loop (in the main thread) stops it between two steps; the checkpoint
    is written (its `stopped` entry "interrupted") and the signal is then delivered as usual (KeyboardInterrupt
    for SIGINT). A resumed run that has nothing left to do (the schedule complete, or `max_minutes` 0) leaves
    the checkpoint as it is.

    Returns `{"steps", "total_steps", "epoch", "loss", "seconds", "total_seconds", "finished", "stopped",
    "checkpoint"}`: steps done so far (all runs), the step count of the full schedule (epochs or max_steps),
    epochs completed, the mean loss of the last (up to 100) steps (the stored one if this call ran none), this
    call's wall time, the training time over all runs, whether the schedule is complete, why this call stopped
    ("finished", "time limit"), and the checkpoint path.
    """
    out = _check_request(config, resume, overwrite)
    device = check_device("auto" if config.device is None else config.device)
    run = _configure(config, out, device, images, labels)
    resumed = resume and out.exists()
    if resumed:
        _resume(run)
    first = run.step
    started = time.monotonic()
    signum = _loop(run, progress)
    if run.step > first or not resumed or run.stopped != run.saved_stopped:
        run.checkpoint()
    if signum:
        signal.raise_signal(signum)  # the handler it would have met: KeyboardInterrupt, or the process ends
    return _report(run, time.monotonic() - started)


def estimate_training_seconds(
    config: TrainConfig, image_shape: tuple[int, ...], num_classes: int | None, steps: int, device=None
) -> float:
    """Estimated wall time in seconds of `steps` training steps of `config`'s model on images `[C, H, W]` =
    `image_shape`, on `device`: one timed step (after one to warm up) on a batch of at most 2 images, scaled
    linearly to `config.batch_size`. A rough guide (a few seconds to measure), not a promise."""
    device = check_device("auto" if device is None else device)
    mconf = {
        "arch": config.arch,
        "in_channels": int(image_shape[0]),
        "channels": config.channels,
        "blocks": config.blocks,
        "padding": config.padding,
        "num_classes": num_classes if config.conditional else None,
    }
    with torch.random.fork_rng(devices=[]):
        model = build_model(mconf).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        b = min(2, config.batch_size)
        x0 = torch.zeros(b, *image_shape, device=device)
        k = torch.full((b,), TIMESTEPS // 2, dtype=torch.int64)
        labels = torch.zeros(b, dtype=torch.int64, device=device) if mconf["num_classes"] else None
        seconds = 0.0
        for _ in range(2):
            started = time.perf_counter()
            loss = diffusion_loss(model, x0, k, torch.randn_like(x0), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
    return seconds * config.batch_size / b * steps


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
