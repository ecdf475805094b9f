"""A diffusers `UNet2DModel` saved on disk as the network of `calibrate`, `compare` and `reproduce`.

    network = load_diffusers_network("ddpm-cifar10")      # or "diffusers:ddpm-cifar10" where a network is taken
    calibrate(network, machines)                          # runs on network.schedule, the network's own noise levels

Layouts (read offline only, `local_files_only=True`): a model directory (`config.json` of a `UNet2DModel` and its
weights) with its scheduler config in the same directory (`scheduler_config.json`) or beside it
(`../scheduler/scheduler_config.json`, as in a pipeline); or a pipeline directory (`model_index.json`, `unet/`,
`scheduler/`). Without a scheduler config, diffusers' default `DDPMScheduler()` is assumed (linear betas 1e-4 to
0.02, 1,000 timesteps, epsilon prediction) and a warning says so; `scheduler=` gives one explicitly.

Noise levels. The scheduler config gives `alphas_cumprod[j]` of the training timesteps j = 0, ..., N - 1 (as
diffusers computes it, float32, for beta_schedule linear, scaled_linear, squaredcos_cap_v2 or `trained_betas`).
Training timestep j is the end of the (j + 1)-th of N intervals, t = (j + 1) / N (the convention of `ELSUNet`), and
`DiffusersNetwork.schedule` is the step function

    abar(t) = alphas_cumprod[j(t)],  j(t) = min(N - 1, max(0, floor(t * N + 1/2) - 1))  for t > 0,  abar(0) = 1,

i.e. t * N rounded half up, minus one. So every sampler step t_i = i / steps lands on a training timestep
(steps = 20, N = 1000: j = 50 i - 1, the timesteps of a diffusers DDIM scheduler with timestep_spacing="trailing"),
the largest, N - 1, at t = 1 (the "network" step grid starts there), and t = 0, which the sampler never evaluates,
is the clean image, abar = 1 (like DDIM's `set_alpha_to_one=True`): the last update returns the x0 prediction.

Timesteps. The eps function gets abar and feeds the network the timestep of that abar: the integer j whose
alphas_cumprod[j] is abar exactly (float64 comparison), which is always the case on `schedule`, so the machines
and the network see the same noise level at every step. On another schedule (a caller's explicit choice) abar
generally lies between two training timesteps: the network then gets the fractional timestep j + f whose sigma
= sqrt((1 - abar) / abar) is interpolated linearly between the neighbours' (diffusers' Euler convention,
`scheduler_levels.table_abar`), so it still sees that abar; an abar outside [alphas_cumprod[N - 1],
alphas_cumprod[0]], or a fractional timestep for a model with a learned (table) time embedding, is refused.

Outputs: the scheduler's `prediction_type` ("epsilon", "sample", "v_prediction") is converted to epsilon exactly
at the abar of the timestep (`scheduler_levels.eps_from_prediction`). Class-conditional models (`num_class_embeds`,
or `class_embed_type="timestep"`) get the labels as `class_labels`.

Imports diffusers only when a network is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import torch

from ..common.fingerprint import module_sha256
from . import OPTIONAL_LIBRARIES, optional_import
from .scheduler_levels import check_prediction_type, eps_from_prediction, scheduler_config

__all__ = ["SPEC_PREFIX", "DiffusersNetwork", "TimestepSchedule", "is_network_spec", "load_diffusers_network"]

SPEC_PREFIX = "diffusers:"
"""A network spec `diffusers:DIR` names a diffusers model or pipeline directory (`load_diffusers_network`)."""

_SCHEDULER_CONFIG = "scheduler_config.json"
PREDICTS = "a diffusers network must predict one of"


class TimestepSchedule:
    """abar(t) on the training timesteps of a diffusers scheduler (see the module docstring): a callable t -> abar
    for `elsfast.ddim_sample` and the machines.

    `alphas_cumprod`: `[N]` float64, decreasing. `timestep(t)` is the integer timestep j(t) (-1 at t = 0: the clean
    image); `timestep_of_abar(abar)` the timestep the network is fed for abar (an int, or a float between two)."""

    def __init__(self, alphas_cumprod: torch.Tensor, label: str) -> None:
        table = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if table.numel() < 2 or not bool(((table > 0) & (table < 1)).all()):
            raise ValueError(f"alphas_cumprod must hold at least 2 values in (0, 1), got {table.numel()} values")
        if not bool((table[1:] <= table[:-1]).all()):
            raise ValueError("alphas_cumprod must not increase with the timestep")
        self.alphas_cumprod = table
        self._values = table.tolist()
        self._sigmas = [math.sqrt((1 - a) / a) for a in self._values]
        self._index = {}
        for j, a in enumerate(self._values):
            self._index.setdefault(a, j)
        digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()[:16]
        self.label = f"diffusers-timesteps({label}, N={table.numel()}, sha256 {digest})"

    @property
    def num_train_timesteps(self) -> int:
        return len(self._values)

    def timestep(self, t: float) -> int:
        """j(t) = min(N - 1, max(0, floor(t N + 1/2) - 1)) for t > 0; -1 (the clean image) for t <= 0."""
        if t <= 0:
            return -1
        n = len(self._values)
        return min(n - 1, max(0, math.floor(t * n + 0.5) - 1))

    def __call__(self, t: float) -> float:
        j = self.timestep(float(t))
        return 1.0 if j < 0 else self._values[j]

    def timestep_of_abar(self, abar: float) -> int | float:
        """The training timestep with noise level abar: the integer j with alphas_cumprod[j] == abar when there is
        one, else j + f with sigma interpolated linearly (see the module docstring); ValueError outside the
        table's range."""
        abar = float(abar)
        j = self._index.get(abar)
        if j is not None:
            return j
        lo, hi = self._values[-1], self._values[0]
        if not lo <= abar <= hi:
            raise ValueError(
                f"abar {abar:.6g} lies outside the network's noise levels [{lo:.6g}, {hi:.6g}] (alphas_cumprod of "
                f"its {len(self._values)} training timesteps): run on the network's own schedule (network.schedule)"
            )
        sigma = math.sqrt((1 - abar) / abar)
        k = next(i for i in range(len(self._sigmas) - 1) if self._sigmas[i] <= sigma <= self._sigmas[i + 1])
        s0, s1 = self._sigmas[k], self._sigmas[k + 1]
        return k + (0.0 if s1 == s0 else (sigma - s0) / (s1 - s0))

    def __repr__(self) -> str:
        return self.label


class DiffusersNetwork:
    """A loaded diffusers `UNet2DModel` with its noise schedule: an `eps_fn(x, abar, labels)` (calling it), its
    `schedule` (`TimestepSchedule`), `prediction_type`, `conditional`, `num_classes` (None when unknown),
    `image_shape` (C, H, W) and `tag` ("diffusers:PATH (module-sha256:...)": the directory and a hash of the
    weights). Build it with `load_diffusers_network`, or directly from a model and a scheduler in memory."""

    def __init__(self, unet: torch.nn.Module, scheduler, *, path: str | Path | None = None) -> None:
        config = dict(unet.config)
        if config.get("time_embedding_type", "positional") not in ("positional", "learned"):
            raise ValueError(
                f"the UNet2DModel has time_embedding_type={config.get('time_embedding_type')!r} (a continuous "
                "sigma input): only 'positional' and 'learned' timestep embeddings are supported"
            )
        if config.get("class_embed_type") not in (None, "timestep"):
            raise ValueError(
                f"the UNet2DModel has class_embed_type={config.get('class_embed_type')!r}: only integer class "
                "labels (num_class_embeds, or class_embed_type='timestep') are supported"
            )
        if config["in_channels"] != config["out_channels"]:
            raise ValueError(
                f"the UNet2DModel has {config['in_channels']} input and {config['out_channels']} output channels: "
                "a network predicting epsilon, x0 or v returns as many channels as it takes"
            )
        sched = scheduler_config(scheduler)
        self.prediction_type = check_prediction_type(sched, PREDICTS)
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise TypeError(f"the scheduler has no alphas_cumprod: {type(scheduler).__name__}")
        size = config.get("sample_size")
        if size is None:
            raise ValueError("the UNet2DModel has no sample_size in its config: its image shape is unknown")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.unet = unet.eval()
        self.image_shape = (int(config["in_channels"]), int(h), int(w))
        self.num_classes = config.get("num_class_embeds")
        self.conditional = self.num_classes is not None or config.get("class_embed_type") == "timestep"
        self.learned_time = config.get("time_embedding_type") == "learned"
        describe = sched.get("beta_schedule", "linear") if sched.get("trained_betas") is None else "trained_betas"
        self.schedule = TimestepSchedule(alphas, f"{describe}, {self.prediction_type}")
        self.path = None if path is None else str(Path(path).resolve())
        self.tag = f"diffusers:{self.path or type(unet).__name__} (module-sha256:{module_sha256(unet)})"

    def timestep(self, abar: float) -> int | float:
        """The timestep the network is fed at abar (`TimestepSchedule.timestep_of_abar`)."""
        step = self.schedule.timestep_of_abar(abar)
        if self.learned_time and not isinstance(step, int):
            raise ValueError(
                f"abar {abar:.6g} is none of the network's training noise levels, and its learned time embedding "
                "takes integer timesteps only: run on the network's own schedule (network.schedule)"
            )
        return step

    def check_schedule(self, schedule, times) -> None:
        """ValueError, before any step runs, unless the network can be fed the abar of `schedule` at every time
        of `times` (`timestep`)."""
        from ..common.schedules import get_schedule

        abar_of = get_schedule(schedule)
        for t in times:
            self.timestep(abar_of(t))

    def check_labels(self, labels: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """`labels` `[batch]` int64 as the network takes them: required when it is conditional (ValueError if
        missing, of another length or outside [0, num_classes)), refused when it is not."""
        if not self.conditional:
            if labels is not None:
                raise ValueError("the diffusers network is unconditional: it takes no labels (run unconditionally)")
            return None
        if labels is None:
            raise ValueError("the diffusers network is class-conditional: pass labels (a conditional run)")
        labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.numel() != batch:
            raise ValueError(f"labels must be one per image ({batch}), got {labels.numel()}")
        if self.num_classes is not None and bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) for this network, got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, abar: float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps `[B, C, H, W]` for noisy images `x` `[B, C, H, W]` at noise level abar: the network runs in its own
        dtype, the conversion of its output to epsilon in x's dtype (float64 x: a float64 conversion), on x's
        device."""
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must be [B, {', '.join(map(str, self.image_shape))}], got {list(x.shape)}")
        labels = self.check_labels(labels, x.shape[0])
        step = self.timestep(abar)
        param = next(self.unet.parameters())
        xin = x.to(param.device, param.dtype)
        dtype = torch.int64 if isinstance(step, int) else torch.float32
        timestep = torch.full((x.shape[0],), step, dtype=dtype, device=param.device)
        kwargs = {} if labels is None else {"class_labels": labels.to(param.device)}
        out = self.unet(xin, timestep, **kwargs).sample.to(x.device, x.dtype)
        return eps_from_prediction(x, out, abar, self.prediction_type)  # in x's precision

    def __repr__(self) -> str:
        kind = "class-conditional" if self.conditional else "unconditional"
        return f"DiffusersNetwork({self.tag}, {self.image_shape}, {kind}, {self.prediction_type}, {self.schedule!r})"


def is_network_spec(value) -> bool:
    """Whether `value` is a network spec string `diffusers:DIR`."""
    return isinstance(value, str) and value.startswith(SPEC_PREFIX)


def _diffusers():
    module, reason = optional_import(*OPTIONAL_LIBRARIES["diffusers"])
    if module is None:
        raise ImportError(f"loading a diffusers network needs diffusers (pip install 'elsfast[diffusers]'): {reason}")
    return module


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not a diffusers config (not JSON: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a diffusers config (a JSON {type(data).__name__})")
    return data


def _locate(directory: Path) -> tuple[Path, Path | None]:
    """The model directory and the scheduler config (None when there is none) of a model or pipeline directory."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no diffusers model directory at {directory}")
    if (directory / "model_index.json").is_file():
        index = _read_json(directory / "model_index.json")
        if "unet" not in index or not (directory / "unet").is_dir():
            raise ValueError(f"the pipeline at {directory} has no unet/ (model_index.json: {sorted(index)})")
        scheduler = directory / "scheduler" / _SCHEDULER_CONFIG
        return directory / "unet", scheduler if scheduler.is_file() else None
    if not (directory / "config.json").is_file():
        raise ValueError(
            f"{directory} is not a diffusers model directory: no config.json (a UNet2DModel) nor model_index.json "
            "(a pipeline with unet/ and scheduler/)"
        )
    for scheduler in (directory / _SCHEDULER_CONFIG, directory.parent / "scheduler" / _SCHEDULER_CONFIG):
        if scheduler.is_file():
            return directory, scheduler
    return directory, None


def _load_scheduler(path: Path):
    diffusers = _diffusers()
    config = _read_json(path)
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ValueError(f"{path} is not a diffusers scheduler config (_class_name {config.get('_class_name')!r})")
    scheduler = cls.from_config(config)
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(f"the scheduler at {path} ({cls.__name__}) has no alphas_cumprod table of timesteps")
    return scheduler


def load_diffusers_network(
    path: str | Path, *, scheduler=None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DiffusersNetwork:
    """Load a diffusers model or pipeline directory (see the module docstring), offline only.

    Args:
        path: the directory, or a spec `diffusers:DIR`.
        scheduler: a diffusers scheduler (with `alphas_cumprod`), or the path of a `scheduler_config.json` or of
            a directory holding one, instead of the one found beside the model.
        device, dtype: where and in which precision the network runs (default: CPU, the saved dtype).
    """
    text = str(path)
    directory = Path(text[len(SPEC_PREFIX) :] if is_network_spec(text) else text)
    model_dir, scheduler_path = _locate(directory)
    diffusers = _diffusers()
    config = _read_json(model_dir / "config.json")
    if config.get("_class_name") != "UNet2DModel":
        raise ValueError(
            f"{model_dir} holds a {config.get('_class_name')!r}, not a diffusers UNet2DModel (the networks that "
            "take [B, C, H, W] images, a timestep and optional class labels)"
        )
    if scheduler is None and scheduler_path is None:
        warnings.warn(
            f"no scheduler config beside {model_dir}: assuming diffusers' default DDPMScheduler() (linear betas "
            "1e-4 to 0.02, 1000 timesteps, epsilon prediction); pass scheduler= if the network used another",
            stacklevel=2,
        )
        scheduler = diffusers.DDPMScheduler()
    elif scheduler is None or isinstance(scheduler, (str, Path)):
        where = Path(scheduler) if scheduler is not None else scheduler_path
        scheduler = _load_scheduler(where / _SCHEDULER_CONFIG if where.is_dir() else where)
    check_prediction_type(scheduler_config(scheduler), PREDICTS)  # before the weights are read
    options = {} if dtype is None else {"torch_dtype": dtype}
    unet = diffusers.UNet2DModel.from_pretrained(model_dir, local_files_only=True, low_cpu_mem_usage=False, **options)
    if device is not None:
        unet = unet.to(device)
    return DiffusersNetwork(unet, scheduler, path=directory)
