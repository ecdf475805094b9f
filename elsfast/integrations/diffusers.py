"""Use an analytic machine where a diffusers `UNet2DModel` is used: `ELSUNet` predicts epsilon, x0 or v.

    from diffusers import DDIMPipeline, DDIMScheduler
    from elsfast.integrations.diffusers import ELSPipeline, ELSUNet

    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True)
    pipe = DDIMPipeline(unet=ELSUNet(machine, patch_size="MNIST_ResNet_zeros"), scheduler=scheduler)
    pipe.unet.follow(pipe)                                # the pipeline's scheduler drives the model
    images = pipe(batch_size=4, num_inference_steps=19, generator=torch.Generator().manual_seed(0)).images
    pipe.save_pretrained("els-pipe")                      # the machine's configuration (+ its data if no dataset)
    pipe = DDIMPipeline.from_pretrained("els-pipe")       # reloads the training set, checks its SHA-256
    pipe = ELSPipeline(unet=pipe.unet, scheduler=pipe.scheduler)      # connects itself
    digits = pipe(class_labels=[3, 7], num_inference_steps=19).images   # class-conditional

`examples/diffusers_pipeline.py` runs all of it. Importing this module imports diffusers (ELSUNet is a diffusers
`ModelMixin` + `ConfigMixin`). Where diffusers is missing or broken (`elsfast.integrations.optional_import`;
`DIFFUSERS_UNAVAILABLE` holds the reason) `ELSUNet` is a plain torch module with the same `forward` (returning
`ELSUNetOutput`), its `save_pretrained`/`from_pretrained` raise ImportError with that reason, and `ELSPipeline`
cannot be imported.

Which scheduler gives a timestep its noise level. `ELSUNet` keeps no copy of a schedule and never looks for its
caller: it reads the scheduler it is connected to, at every call:

1. a pipeline: `pipe.unet.follow(pipe)` (ELSPipeline does it itself): the pipeline's current `scheduler`
   attribute, so `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, ...)` is followed;
2. a scheduler: `ELSUNet(machine, scheduler)` or `unet.follow(scheduler)`, read live (an in-place change is
   followed). Note that `DDIMPipeline(unet, scheduler)` keeps a copy of `scheduler`, not `scheduler` itself;
3. none: it refuses (RuntimeError) and says how to connect one.

A timestep tensor that is a view of a scheduler's `timesteps` table (as pipelines iterate them) must come from the
connected scheduler's table (else RuntimeError: a model connected to a scheduler its pipeline replaced would run
on the old noise levels). `torch.compile(unet)` and `unet.compile()` work (the compiled kernels are graph breaks).

Schedulers with a `sigmas` table (Euler, Heun, KDPM2, LMS, DPM-Solver, ...) give the model the sigma of their
current step (`elsfast.integrations.scheduler_levels`): abar = 1 / (1 + sigma^2), the scheduler's own noise level
to float rounding (Karras sigmas, KDPM2's midpoints). Otherwise:
An integer timestep j uses `alphas_cumprod[j]`; a fractional one (Euler-type schedulers) interpolates sigma =
sqrt((1 - abar) / abar) linearly between the neighbours, as those schedulers do. An abar of 0 (zero-terminal-SNR
schedules) is raised to 1e-12. The patch size is chosen from the time t = (j + 1) / num_train_timesteps: diffusers'
training timestep j is the end of the (j + 1)-th of num_train_timesteps intervals, e.g.
`beta_schedule="squaredcos_cap_v2"` has `alphas_cumprod[j] = abar((j + 1) / N)` of elsfast's "cosine" schedule.
(t = j / N would shift a published 20-entry P(t) list by one step when N = 20.) A `[B]` tensor of unequal
timesteps is evaluated per distinct value (the machine evaluates one noise level per call).

Scheduler settings that matter (ELSUNet refuses other prediction types and warns about clip_sample=True,
thresholding=True and set_alpha_to_one=False):

- `clip_sample=False`: the paper's sampler never clips the x0 prediction (diffusers' default is True);
- `prediction_type`: "epsilon", "sample" (the machine's x0) or "v_prediction", exact conversions of the machine's
  x0 prediction;
- `set_alpha_to_one=True` (DDIM): the last step lands on abar = 1, so the output is the machine's x0 prediction;
  with False it lands on alphas_cumprod[0] and keeps a little noise;
- `timestep_spacing` / `steps_offset`: which training timesteps the inference steps visit. "leading" visits
  j = m * (N // num_inference_steps) + steps_offset, m = 0, 1, ...; "trailing" starts at N - 1; "linspace"
  rounds an even grid from 0 to N - 1. Stock cosine schedulers (`squaredcos_cap_v2`) follow elsfast's "cosine"
  schedule, not the paper's "cosine-legacy": use `ddim_scheduler_config` (or its `trained_betas`) for the latter.

Reproducing `elsfast.sample(..., steps=n)` exactly: `make_ddim_scheduler(n, schedule, substeps=k)` (or
`DDIMScheduler(**ddim_scheduler_config(n, schedule, k))`) builds a DDIMScheduler with N = n * k training
timesteps whose `trained_betas` make `alphas_cumprod[j] = abar((j + 1) / N)`, `timestep_spacing="leading"` and
`steps_offset=k - 1`; with `num_inference_steps = n - 1` it visits j = i * k - 1, i.e. abar(i / n) for
i = n - 1, ..., 1, and lands on abar = 1, like elsfast's sampler. With the same noise (the pipeline draws it as
`elsfast.sample` does: `torch.randn([n, C, H, W], generator=g, dtype=machine.dtype)` on the CPU) the images agree
up to the float32 rounding of diffusers' alphas_cumprod, which the sampler amplifies: measured worst 2.5e-5
(float64 machine) and 5e-4 (float32 machine) in [-1, 1] units; with exact float64 alphas_cumprod, 1e-15
(`tests/test_diffusers.py`).

Saving and loading. `save_pretrained(d)` (also through `pipe.save_pretrained`) writes `d/config.json`: the
diffusers keys pipelines read (`sample_size`, `in_channels`, `out_channels`), the patch-size spec and, under
`machine`, `ScoreMachine.config()`: the machine's parameters, the training set's SHA-256 and, for a machine built
by `ScoreMachine.from_dataset`, the dataset reference. The training images are copied (`d/training_set.pt`) when
the machine records no dataset, or when asked (`save_training_set=True`, at construction, in the call, or in
`ELSPipeline.save_pretrained`); `save_training_set=False` for a machine without a dataset reference is refused at
save time, since the directory could not be reloaded. `from_pretrained(d)` rebuilds
the machine from the dataset reference, the saved copy, or `train_images=` (in that order of preference:
`train_images=`, the copy, the reference) and refuses a training set whose SHA-256 differs, or none, with a
message that says what to pass. A callable patch size cannot be saved (save_pretrained says so).

Loading in a fresh process. diffusers 0.42 imports no module that a saved `model_index.json` names (that would run
the repository's code): `import elsfast.integrations.diffusers` first (diffusers' error says so), then
`DDIMPipeline.from_pretrained(d)` (connect it: `pipe.unet.follow(pipe)`) and `DiffusionPipeline.from_pretrained(d)`
of a saved ELSPipeline (this module makes `ELSPipeline` a name diffusers finds) load it. diffusers' warning
"Expected types for unet: (UNet2DModel,), got ELSUNet" is filtered: the model has UNet2DModel's interface.

Precision. Machines compute in float32 or float64 (`.to(torch.float64)` / `.double()` give the model its own
converted copy of the machine, `unet.machine`: the machine it was given, maybe shared, is left as it was). Half
precision (`torch_dtype=torch.float16` in `from_pretrained`, `pipe.to(torch.float16)`) sets the dtype of the
model's inputs and outputs only: pipelines then draw their noise and run their scheduler in float16, and the
machine still computes in float32, because a softmax over patch distances at low noise needs more than float16's
11 significant bits (the logits scale as 1 / (1 - abar)).
"""

from __future__ import annotations

import inspect
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..common.fileio import atomic_write
from ..common.scales import PatchSizeSpec, check_patch_size_spec, patch_size_at
from ..common.schedules import get_schedule
from ..machine import ScoreMachine
from . import OPTIONAL_LIBRARIES, optional_import
from ._machine_module import MachineModule
from .scheduler_levels import check_scheduler, convert_prediction, scheduler_config, table_abar

__all__ = ["DIFFUSERS_UNAVAILABLE", "TRAINING_SET_NAME", "ELSUNet", "ELSUNetOutput", "ddim_scheduler_config"]
__all__ += ["make_ddim_scheduler"]

TRAINING_SET_NAME = "training_set.pt"
"""The file `save_pretrained(..., save_training_set=True)` writes beside config.json: `{"images", "labels"}`."""

_diffusers, DIFFUSERS_UNAVAILABLE = optional_import(*OPTIONAL_LIBRARIES["diffusers"])
"""Why diffusers cannot be used here ("" when it can): missing, or installed but failing to import."""

if _diffusers is not None:
    try:
        from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
        from diffusers.models.unets.unet_2d import UNet2DOutput
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from diffusers.utils.torch_utils import randn_tensor
    except Exception as err:  # a submodule that fails to import makes diffusers as unusable as a missing one
        _diffusers, DIFFUSERS_UNAVAILABLE = None, f"{type(err).__name__}: {' '.join(str(err).split())}"


@dataclass
class ELSUNetOutput:
    """What `ELSUNet.forward` returns when diffusers is not available (diffusers' `UNet2DOutput` otherwise)."""

    sample: torch.Tensor


class _Config(dict):
    """A read-only dict with attribute access, like diffusers' `FrozenDict` (`unet.config.sample_size`)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("ELSUNet's config is frozen")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = _readonly


def _saveable_patch_size(patch_size: PatchSizeSpec) -> int | str | list[int] | None:
    """The JSON form of a patch-size spec, or None for a callable (which cannot be saved)."""
    if callable(patch_size):
        return None
    if isinstance(patch_size, str):
        return patch_size
    if isinstance(patch_size, int):
        return int(patch_size)
    return [int(p) for p in patch_size]


_Bases: tuple[type, ...] = (MachineModule,) if _diffusers is None else (MachineModule, ModelMixin, ConfigMixin)


class ELSUNet(*_Bases):
    """A `ScoreMachine` as a diffusers model predicting epsilon, x0 or v (see the module docstring).

    Args:
        machine: the analytic machine, a submodule; `.to()` on this module moves or converts a copy of it (so a
            machine shared with other adapters is left as it is).
        scheduler: optional; the scheduler to read noise levels and the prediction type from. `follow()` changes
            it, or connects a pipeline instead (`pipe.unet.follow(pipe)`: its current scheduler).
        patch_size: an odd int; a callable of t = (timestep + 1) / num_train_timesteps; a list or the name of a
            published calibrated list (`elsfast.reference_scales()`), entry round(t * len) clipped to the list.
        save_training_set: whether `save_pretrained` writes a copy of the training images (default None: when
            the machine records no dataset reference; else only its SHA-256 and the reference).
    """

    config_name = "config.json"

    def __init__(
        self,
        machine: ScoreMachine,
        scheduler=None,
        patch_size: PatchSizeSpec = 3,
        *,
        save_training_set: bool | None = None,
    ) -> None:
        super().__init__(machine)
        check_patch_size_spec(patch_size)  # an unknown name, an empty list or an even size fails here
        self.patch_size = patch_size
        self.save_training_set = None if save_training_set is None else bool(save_training_set)
        self.io_dtype: torch.dtype | None = None  # float16 / bfloat16 inputs and outputs (the machine stays fp32)
        self._scheduler = None  # the connected scheduler, or
        self._pipeline = None  # a weak reference to the connected pipeline, whose current scheduler is read
        if scheduler is not None:
            self.follow(scheduler)
        self._register_config()

    # ------------------------------------------------------------------ configuration

    def _register_config(self) -> None:
        c, h, w = self.machine.image_shape
        values = {
            "sample_size": h if h == w else [h, w],
            "in_channels": c,
            "out_channels": c,
            "patch_size": _saveable_patch_size(self.patch_size),
            "machine": self.machine.config(),
        }
        if _diffusers is None:
            self.__dict__["config"] = _Config(values)
        else:
            self.register_to_config(**values)

    def follow(self, source) -> ELSUNet:
        """Connect the scheduler that turns timesteps into noise levels; returns self. `source`: a scheduler (read
        live: an in-place change is followed), or a diffusers pipeline that holds this model (its `scheduler`
        attribute is read at every call, so `pipe.scheduler = ...` is followed; the pipeline is held by a weak
        reference). `ELSPipeline` connects itself; a stock pipeline needs `pipe.unet.follow(pipe)`."""
        if _diffusers is not None and isinstance(source, DiffusionPipeline):
            if not any(getattr(v, "_orig_mod", v) is self for v in vars(source).values()):  # torch.compile'd too
                raise ValueError(f"the {type(source).__name__} does not hold this ELSUNet as a component")
            check_scheduler(source.scheduler)
            self._scheduler, self._pipeline = None, weakref.ref(source)
        else:
            check_scheduler(source)
            self._scheduler, self._pipeline = source, None
        return self

    @property
    def scheduler(self):
        """The connected scheduler (the connected pipeline's current one), or None."""
        pipe = self._pipeline() if self._pipeline is not None else None
        return pipe.scheduler if pipe is not None else self._scheduler

    def driving_scheduler(self, timestep=None):
        """The connected scheduler, checked. A `timestep` tensor taken from a scheduler's `timesteps` table (a view
        of it, as pipelines iterate them) must come from the connected scheduler's table: a model still connected
        to a scheduler its pipeline replaced (DDIMPipeline even replaces the one it is given, by a copy) is
        refused instead of running on another scheduler's noise levels."""
        scheduler = self.scheduler
        if scheduler is None:
            raise RuntimeError(
                "ELSUNet does not know which scheduler drives it, so it cannot turn a timestep into a noise level: "
                "connect the pipeline that holds it with pipe.unet.follow(pipe) (ELSPipeline does it itself), or "
                "a scheduler with ELSUNet(machine, scheduler) or unet.follow(scheduler)"
            )
        if self._pipeline is not None:
            check_scheduler(scheduler)  # the pipeline's scheduler may have been replaced since the last call
        table = timestep._base if isinstance(timestep, torch.Tensor) else None
        own = getattr(scheduler, "timesteps", None)
        if isinstance(own, torch.Tensor) and own._base is not None:
            own = own._base  # the table itself may be a view; its elements' _base is then its base
        if table is not None and table.dim() == 1 and isinstance(own, torch.Tensor) and table is not own:
            raise RuntimeError(
                "the timestep comes from another timesteps table than the connected scheduler's (a pipeline's own "
                "scheduler, or one that replaced it?): connect the pipeline with pipe.unet.follow(pipe), or pass "
                "the timestep as a number to use the connected scheduler's noise level"
            )
        return scheduler

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's inputs and outputs (pipelines draw their noise in it): the machine's, or
        float16 / bfloat16 after `.to(torch.float16)` (the machine then still computes in float32)."""
        return self.io_dtype if self.io_dtype is not None else self.machine.dtype

    def _apply(self, fn, recurse: bool = True):
        probe = fn(torch.empty(0, device=self.machine.device, dtype=self.dtype))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            if probe.dtype in (torch.float32, torch.float64):
                self.io_dtype = None
            elif probe.dtype != self.dtype:
                self.io_dtype = probe.dtype
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------------ the model

    def _timesteps(self, timestep, batch: int, num_train_timesteps: int) -> torch.Tensor:
        """The timestep of each sample, `[batch]` float64."""
        values = torch.as_tensor(timestep).detach().to("cpu", torch.float64).flatten()
        if values.numel() == 0:
            raise ValueError("timestep is an empty tensor")
        if values.numel() not in (1, batch):
            raise ValueError(f"timestep must be one value or one per sample ({batch}), got {values.numel()}")
        bad = ~(torch.isfinite(values) & (values >= 0) & (values <= num_train_timesteps - 1))
        if bad.any():
            raise ValueError(
                f"timestep must lie in [0, {num_train_timesteps - 1}] (the driving scheduler's training timesteps), "
                f"got {values[bad].tolist()}"
            )
        return values.expand(batch)

    def abar(self, timestep: float, scheduler=None) -> float:
        """abar of a (possibly fractional) timestep of `scheduler` (default: the connected one): from the
        scheduler's `sigmas` at its current step when it has such a table, else `alphas_cumprod[j]` or sigma
        interpolated linearly between two neighbours (`elsfast.integrations.scheduler_levels.table_abar`)."""
        return table_abar(scheduler if scheduler is not None else self.driving_scheduler(), timestep)

    def time(self, timestep: float, scheduler=None) -> float:
        """t = (timestep + 1) / num_train_timesteps of `scheduler` (default: `driving_scheduler()`), clipped to
        [0, 1]: the time the patch-size spec sees."""
        n = len((scheduler if scheduler is not None else self.driving_scheduler()).alphas_cumprod)
        return min(1.0, max(0.0, (timestep + 1) / n))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | int | list[int] | None = None,
        return_dict: bool = True,
        **unused: Any,
    ):
        """The prediction (the connected scheduler's `prediction_type`: epsilon, x0 or v) for `sample`
        `[B, C, H, W]` at `timestep` of that scheduler: an int or float,
        a 0-d tensor, or a `[B]` tensor (one per sample; unequal values are evaluated per distinct value).
        `class_labels` (one int or `[B]`) select class-conditional dictionaries. Returns
        `UNet2DOutput(sample=out)` (`ELSUNetOutput` without diffusers), or `(out,)` if not return_dict; out has
        the dtype and device of `sample`. Other keyword arguments of `UNet2DModel.forward` are not supported and
        raise TypeError."""
        if unused:
            raise TypeError(f"ELSUNet.forward got unsupported arguments {sorted(unused)}")
        scheduler = self.driving_scheduler(timestep)
        prediction = scheduler_config(scheduler).get("prediction_type", "epsilon")
        batch = sample.shape[0]
        steps = self._timesteps(timestep, batch, len(scheduler.alphas_cumprod))
        labels = class_labels
        if isinstance(labels, int):
            labels = torch.full((batch,), labels, dtype=torch.int64)
        elif labels is not None:
            labels = torch.as_tensor(labels).flatten().cpu()
        distinct = steps.unique()
        if distinct.numel() == 1:
            out = self._predict(sample, distinct.item(), labels, scheduler, prediction)
        else:
            out = torch.empty_like(sample)
            for value in distinct.tolist():
                rows = (steps == value).nonzero().flatten()
                part = None if labels is None else labels[rows]
                rows = rows.to(sample.device)
                out[rows] = self._predict(sample[rows], value, part, scheduler, prediction)
        if not return_dict:
            return (out,)
        return ELSUNetOutput(sample=out) if _diffusers is None else UNet2DOutput(sample=out)

    def _predict(
        self, sample: torch.Tensor, timestep: float, labels: torch.Tensor | None, scheduler, prediction: str
    ) -> torch.Tensor:
        """The scheduler's `prediction` (epsilon, sample or v) at one timestep, in the dtype of `sample`."""
        size = patch_size_at(self.patch_size, self.time(timestep, scheduler))
        abar = self.abar(timestep, scheduler)
        x = sample.to(self.machine.device, self.machine.dtype)
        out = convert_prediction(x, self.machine.denoise(x, abar, size, labels), abar, prediction)
        return out.to(sample.device, sample.dtype)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size!r}"

    # ------------------------------------------------------------------ save and load

    def save_pretrained(
        self,
        save_directory: str | Path,
        is_main_process: bool = True,
        *,
        save_training_set: bool | None = None,
        **unused: Any,
    ) -> None:
        """Write `save_directory/config.json` (atomically): the frozen config with the machine's configuration and
        its training set's SHA-256 (see the module docstring); with `save_training_set` also `training_set.pt`.
        Default (None here and in the constructor): the copy is written when the machine records no dataset
        reference, so the directory can always be reloaded; False for such a machine raises ValueError (before
        anything is written). Only the main process writes. diffusers' weight options
        (`safe_serialization`, `variant`, ...) are accepted and ignored: the model has no weights."""
        if _diffusers is None:
            raise ImportError(f"ELSUNet.save_pretrained needs diffusers, which is unavailable: {DIFFUSERS_UNAVAILABLE}")
        if callable(self.patch_size):
            raise ValueError(
                "a callable patch_size cannot be saved: use an int, a list or a calibrated list name "
                "(elsfast.reference_scales())"
            )
        if save_training_set is None:
            save_training_set = self.save_training_set
        if save_training_set is None:  # by default a directory that can be reloaded: a copy without a reference
            save_training_set = self.machine.source is None
        if not save_training_set and self.machine.source is None:
            raise ValueError(
                "save_training_set=False, but the machine was built from tensors and records no dataset, so the "
                "saved directory could not be reloaded: save with save_training_set=True (or leave it unset), or "
                "build the machine with ScoreMachine.from_dataset"
            )
        if not is_main_process:
            return
        self._register_config()  # the machine may have moved or changed dtype since construction
        directory = Path(save_directory)
        text = self.to_json_string().encode()
        atomic_write(directory / self.config_name, lambda f: f.write(text))
        if save_training_set:
            labels = None if self.machine.labels is None else self.machine.labels.cpu()
            data = {"images": self.machine.images.cpu(), "labels": labels}
            atomic_write(directory / TRAINING_SET_NAME, lambda f: torch.save(data, f))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        subfolder: str | None = None,
        train_images: torch.Tensor | None = None,
        train_labels: torch.Tensor | None = None,
        root: str | Path | None = None,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        scheduler=None,
        **unused: Any,
    ) -> ELSUNet:
        """Rebuild a model saved by `save_pretrained` from a local directory (`subfolder` inside it, as diffusers'
        pipelines pass). The training set comes from `train_images`/`train_labels`, else the saved copy, else the
        dataset reference (`root` as for `elsfast.datasets.load`); it must have the recorded SHA-256 (ValueError
        otherwise, or when there is none). `torch_dtype` (or `dtype`): float32/float64 set the machine's compute
        dtype, float16/bfloat16 the dtype of inputs and outputs only. diffusers' loading options (`device_map`,
        `variant`, `low_cpu_mem_usage`, ...) are accepted and ignored: the model has no weights."""
        if _diffusers is None:
            raise ImportError(f"ELSUNet.from_pretrained needs diffusers, which is unavailable: {DIFFUSERS_UNAVAILABLE}")
        directory = Path(pretrained_model_name_or_path)
        if subfolder:
            directory = directory / subfolder
        path = directory / cls.config_name
        if not path.is_file():
            raise FileNotFoundError(f"no ELSUNet config at {path}")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a readable ELSUNet config (not JSON: {err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} is not an ELSUNet config (a JSON {type(config).__name__}, not an object)")
        if config.get("_class_name") != cls.__name__ or "machine" not in config:
            raise ValueError(f"{path} is not an ELSUNet config (_class_name {config.get('_class_name')!r})")
        copy = directory / TRAINING_SET_NAME
        if train_images is None and copy.is_file():
            data = torch.load(copy, map_location="cpu", weights_only=True)
            train_images, train_labels = data["images"], data["labels"]
        try:
            machine = ScoreMachine.from_config(
                config["machine"], train_images=train_images, train_labels=train_labels, root=root, device=device
            )
        except (ValueError, FileNotFoundError) as err:
            raise (FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError)(
                f"cannot rebuild the ELSUNet saved in {directory}: {err}. Pass the training set with "
                f"ELSUNet.from_pretrained(path, train_images=..., train_labels=...) (give the model to a pipeline's "
                f"from_pretrained as unet=...), or save it with save_training_set=True"
            ) from err
        patch_size = config.get("patch_size")
        unet = cls(machine, scheduler, 3 if patch_size is None else patch_size)
        dtype = torch_dtype if torch_dtype is not None else dtype
        if dtype in (torch.float32, torch.float64):
            machine.to(dtype=dtype)
        elif dtype is not None:
            if not dtype.is_floating_point:
                raise ValueError(f"torch_dtype must be a floating-point dtype, got {dtype}")
            unet.io_dtype = dtype
        return unet


def _class_labels(class_labels, batch_size: int) -> torch.Tensor | None:
    if class_labels is None:
        return None
    labels = torch.as_tensor(class_labels, dtype=torch.int64).flatten()
    if labels.numel() == 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(f"class_labels must be one label or one per image ({batch_size}), got {labels.numel()}")
    return labels


if _diffusers is not None:
    __all__ += ["ELSPipeline"]

    class ELSPipeline(DiffusionPipeline):
        """Sample images from an `ELSUNet` with any diffusers scheduler (DDIM, DDPM, Euler, DPM-Solver++, ...),
        optionally class-conditional.

        The loop is the one of `DDIMPipeline`/`DDPMPipeline`, made scheduler-generic (`scale_model_input`,
        `init_noise_sigma`), plus `class_labels`. The initial noise is drawn as those pipelines draw it
        (`randn_tensor([B, C, H, W], generator, dtype=unet.dtype)`), so with `make_ddim_scheduler(n)` and
        `num_inference_steps = n - 1` the images are `elsfast.sample`'s for the same generator.
        """

        model_cpu_offload_seq = "unet"

        def __init__(self, unet: ELSUNet, scheduler) -> None:
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)
            unet.follow(self)

        def save_pretrained(self, save_directory, *args, save_training_set: bool | None = None, **kwargs) -> None:
            """diffusers' `save_pretrained`; `save_training_set` (default: the unet's own choice, see
            `ELSUNet.save_pretrained`) decides whether `unet/training_set.pt` is written."""
            kept = self.unet.save_training_set
            if save_training_set is not None:
                self.unet.save_training_set = bool(save_training_set)
            try:
                super().save_pretrained(save_directory, *args, **kwargs)
            finally:
                self.unet.save_training_set = kept

        @torch.no_grad()
        def __call__(
            self,
            batch_size: int | None = None,
            class_labels: torch.Tensor | list[int] | int | None = None,
            generator: torch.Generator | list[torch.Generator] | None = None,
            num_inference_steps: int = 50,
            eta: float = 0.0,
            output_type: str = "pil",
            return_dict: bool = True,
        ):
            """Generate images.

            Args:
                batch_size: how many images (default: one per class label, else 1).
                class_labels: one label for every image, or one per image (`[batch_size]`); the machine must have
                    training labels. None: unconditional.
                generator: the torch generator(s) of the initial noise (and of DDPM's / DDIM eta's noise).
                num_inference_steps: scheduler steps.
                eta: DDIM's eta, passed to schedulers whose `step` accepts it.
                output_type: "pil", "np" (`[B, H, W, C]` in [0, 1]) or "pt" (`[B, C, H, W]` in [0, 1]).
                return_dict: return an `ImagePipelineOutput` (else a tuple `(images,)`).
            """
            if output_type not in ("pil", "np", "pt"):
                raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
            if batch_size is None:
                batch_size = 1 if class_labels is None or isinstance(class_labels, int) else len(class_labels)
            labels = _class_labels(class_labels, batch_size)
            config = self.unet.config
            size = config.sample_size
            h, w = (size, size) if isinstance(size, int) else size
            shape = (batch_size, config.in_channels, h, w)
            self.unet.follow(self)  # this pipeline's current scheduler drives the model (also after a swap)
            # diffusers' order: set_timesteps first, since init_noise_sigma is the first sigma of that schedule
            self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
            image = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
            image = image * self.scheduler.init_noise_sigma
            accepted = set(inspect.signature(self.scheduler.step).parameters)
            extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}
            for t in self.progress_bar(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(image, t)
                eps = self.unet(model_input, t, class_labels=labels).sample
                image = self.scheduler.step(eps, t, image, **extra).prev_sample
            image = (image / 2 + 0.5).clamp(0, 1)
            if output_type == "pt":
                images = image
            else:
                images = image.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
            self.maybe_free_model_hooks()
            if not return_dict:
                return (images,)
            return ImagePipelineOutput(images=images)

    # diffusers' DiffusionPipeline.from_pretrained finds a saved pipeline's class (model_index.json's _class_name)
    # as an attribute of the diffusers module: make ELSPipeline one, so that it loads ELSPipeline directories
    if getattr(_diffusers, "ELSPipeline", None) is None:
        _diffusers.ELSPipeline = ELSPipeline

    class _DuckTypedUNetFilter(logging.Filter):
        """Drops diffusers' "Expected types for unet: (UNet2DModel,), got ELSUNet" when a stock pipeline (typed
        for a UNet2DModel) loads an ELSUNet: the model has UNet2DModel's interface, so the warning is spurious."""

        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            return not (message.startswith("Expected types for") and f"got {ELSUNet!r}" in message)

    logging.getLogger("diffusers.pipelines.pipeline_utils").addFilter(_DuckTypedUNetFilter())

else:

    def __getattr__(name: str):
        if name == "ELSPipeline":
            raise ImportError(f"ELSPipeline needs diffusers, which is unavailable: {DIFFUSERS_UNAVAILABLE}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ddim_scheduler_config(steps: int = 20, schedule="cosine-legacy", substeps: int = 1) -> dict:
    """DDIMScheduler arguments that reproduce `elsfast.sample(..., steps=steps, schedule=schedule)` when the
    pipeline runs `num_inference_steps = steps - 1` (see the module docstring). `substeps` k puts k training
    timesteps between two inference steps (N = steps * k; needs k < steps - 1 unless steps == 2)."""
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if substeps < 1 or (steps > 2 and substeps >= steps - 1):
        raise ValueError(f"substeps must lie in [1, {max(1, steps - 2)}] for {steps} steps, got {substeps}")
    abar_of = get_schedule(schedule)
    n = steps * substeps
    betas, prev = [], 1.0  # alphas_cumprod[j] = prod_{l <= j} (1 - beta_l) = abar((j + 1) / n)
    for j in range(n):
        cur = abar_of((j + 1) / n)
        betas.append(min(1.0, max(0.0, 1.0 - cur / prev)) if prev > 0 else 1.0)
        prev = cur
    return {
        "num_train_timesteps": n,
        "trained_betas": betas,
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": substeps - 1,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "thresholding": False,
        "rescale_betas_zero_snr": False,
    }


def make_ddim_scheduler(steps: int = 20, schedule="cosine-legacy", substeps: int = 1):
    """A diffusers `DDIMScheduler(**ddim_scheduler_config(steps, schedule, substeps))`; run it with
    `num_inference_steps = steps - 1`."""
    if _diffusers is None:
        raise ImportError(
            f"make_ddim_scheduler needs diffusers (pip install 'elsfast[diffusers]'): {DIFFUSERS_UNAVAILABLE}"
        )
    from diffusers import DDIMScheduler

    return DDIMScheduler(**ddim_scheduler_config(steps, schedule, substeps))
