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
A diffusers model directory enters as a loaded `elsfast.integrations.diffusers_network.DiffusersNetwork` or as the
spec string "diffusers:DIR" (`resolve_network`): its own noise schedule is then the schedule of the run (the
machines and the network see the same abar at every step) unless `schedule` is given explicitly.

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
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..common.fileio import atomic_write, describe_file
from ..common.schedules import get_schedule, schedule_name, x0_from_eps
from ..integrations.diffusers_network import DiffusersNetwork, is_network_spec, load_diffusers_network
from ..machine import ScoreMachine
from ..nets.models import NetworkDenoiser, eps_at
from ..sampling import ddim_sample
from .metrics import cosine_similarity

__all__ = [
    "DEFAULT_SIZES",
    "CalibrationResult",
    "EpsFn",
    "as_eps_fn",
    "calibrate",
    "check_network_fits",
    "label_tensor",
    "network_denoiser",
    "resolve_network",
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
    on `schedule`); any other callable is taken to be an eps_fn already. A `ScoreMachine` (a module too, but with
    the signature `(x, abar, patch_size, labels)`) is refused."""
    if isinstance(network, ScoreMachine):
        raise TypeError(
            "the network is an elsfast.ScoreMachine: pass a network, or an eps_fn such as "
            "lambda x, abar, labels: machine.eps(x, abar, patch_size, labels)"
        )
    if isinstance(network, torch.nn.Module):

        def eps_fn(x: torch.Tensor, abar: float, labels: torch.Tensor | None) -> torch.Tensor:
            return eps_at(network, x, abar, labels, schedule=schedule)

        return eps_fn
    if not callable(network):
        raise TypeError(f"the network must be a torch.nn.Module or a callable eps_fn(x, abar, labels), got {network!r}")
    return network


def resolve_network(
    network, schedule: str | Callable[[float], float] | None = None
) -> tuple[EpsFn, str | Callable[[float], float], str | None]:
    """`(eps_fn, schedule, tag)` of a run on `network`: a spec "diffusers:DIR" is loaded
    (`load_diffusers_network`); a `DiffusersNetwork` is its own eps_fn, runs on its own schedule unless `schedule`
    is given (then it is fed the fractional timestep of each abar, see `elsfast.integrations.diffusers_network`) and
    has a tag (its directory and a hash of its weights); anything else goes through `as_eps_fn` on `schedule`
    (default "cosine-legacy") and has no tag."""
    if isinstance(network, str):
        if not is_network_spec(network):
            raise ValueError(f"a network given as a string must be a spec 'diffusers:DIR', got {network!r}")
        network = load_diffusers_network(network)
    if isinstance(network, DiffusersNetwork):
        return network, network.schedule if schedule is None else schedule, network.tag
    schedule = "cosine-legacy" if schedule is None else schedule
    return as_eps_fn(network, schedule), schedule, None


def check_network_fits(
    eps_fn,
    image_shape: Sequence[int],
    conditional: bool,
    classes: Sequence[int] | None,
    schedule: str | Callable[[float], float] | None = None,
    times: Sequence[float] = (),
) -> None:
    """For a `DiffusersNetwork` (other eps_fns say nothing about themselves): ValueError unless its image shape is
    `image_shape`, it is class-conditional exactly when the run is, it knows every class of `classes`, and it can
    be fed the abar of `schedule` at each of `times` (the times it will be evaluated at)."""
    if not isinstance(eps_fn, DiffusersNetwork):
        return
    if schedule is not None:
        eps_fn.check_schedule(schedule, times)
    if tuple(eps_fn.image_shape) != tuple(int(s) for s in image_shape):
        raise ValueError(
            f"the network {eps_fn.tag} takes images of shape {eps_fn.image_shape}, the machines' training images "
            f"have shape {tuple(image_shape)}"
        )
    if eps_fn.conditional != bool(conditional):
        kind = "class-conditional" if eps_fn.conditional else "unconditional"
        run = "class-conditional" if conditional else "unconditional"
        raise ValueError(
            f"the network {eps_fn.tag} is {kind} and the run is {run}: pass conditional={eps_fn.conditional} (and "
            "training labels for a conditional run)"
        )
    if classes is not None and eps_fn.num_classes is not None and max(classes) >= eps_fn.num_classes:
        raise ValueError(
            f"the network {eps_fn.tag} knows {eps_fn.num_classes} classes; the training labels go up to {max(classes)}"
        )


def network_denoiser(
    eps_fn: EpsFn, labels: torch.Tensor | None = None
) -> Callable[[torch.Tensor, float, int], torch.Tensor]:
    """Deprecated: use `elsfast.nets.models.NetworkDenoiser(eps_fn, labels=labels)`, the one network denoiser."""
    warnings.warn(
        "network_denoiser is deprecated; use elsfast.nets.models.NetworkDenoiser(eps_fn, labels=labels)",
        DeprecationWarning,
        stacklevel=2,
    )
    return NetworkDenoiser(eps_fn, labels=labels)


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


def label_tensor(labels: Sequence[int | None]) -> torch.Tensor | None:
    """The labels of `seed_labels` as the `[B]` int64 tensor networks and machines take (None when unconditional)."""
    return None if labels[0] is None else torch.tensor(labels, dtype=torch.int64)


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
      always one of the candidates), entry 0 a copy of entry 1;
    - `network`: a tag naming the network it was calibrated against (e.g. its checkpoint and training step), or
      None; `reproduce` sets it so that a calibration is never reused for a network that has trained on.
    """

    steps: int
    sizes: list[int]
    seeds: list[int]
    labels: list[int | None]
    best: torch.Tensor
    cosine: torch.Tensor
    schedule: str = "cosine-legacy"
    machine: dict = field(default_factory=dict)
    network: str | None = None

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
            "network": self.network,
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
            network=data.get("network"),
        )

    def plot(self, path: str | Path) -> Path:
        """Draw the calibration (`elsfast.plots.calibration`: the cosine similarity of every candidate size over t
        and the chosen P(t)) at `path`: PNG, SVG or PDF by the extension, written atomically (a file elsfast did not
        write is refused). Needs matplotlib (`pip install elsfast[plots]`): ImportError otherwise."""
        from ..plots.calibration import save_calibration_figure

        return save_calibration_figure(path, self.sizes, self.cosine, self.best, self.scales)


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
    schedule: str | Callable[[float], float] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> CalibrationResult:
    """Calibrate P(t) of a machine against a network (see the module docstring).

    Args:
        eps_fn: the network, `eps_fn(x, abar, labels) -> eps`, a `torch.nn.Module` (wrapped by `as_eps_fn`,
            which maps abar to the network's time on `schedule`), or a diffusers network (a `DiffusersNetwork` or
            "diffusers:DIR", see `resolve_network`; the result then records its tag as `network`).
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
        schedule: the noise schedule of the sampler (a name or a callable t -> abar); default: a diffusers
            network's own, else "cosine-legacy".
        batch_size: seeds per batch (default all at once).
    """
    eps_fn, schedule, tag = resolve_network(eps_fn, schedule)
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
    check_network_fits(eps_fn, shape, conditional, classes, schedule, [i / steps for i in range(1, steps)])

    S, K = len(seeds), len(sizes)
    best = torch.zeros(S, steps, dtype=torch.int64)
    cosine = torch.full((S, steps, K), float("nan"), dtype=torch.float64)
    batch = S if batch_size is None else max(1, int(batch_size))
    for lo in tqdm(range(0, S, batch), desc="calibrating", disable=not progress or batch >= S, leave=False):
        rows = slice(lo, min(S, lo + batch))
        x = seed_noise(seeds[rows], shape)
        y = label_tensor(labels[rows])

        def denoiser(x_t: torch.Tensor, abar: float, i: int, rows=rows, y=y) -> torch.Tensor:
            eps = eps_fn(x_t, abar, y).to(x_t)
            for k, p in enumerate(sizes):
                cosine[rows, i, k] = cosine_similarity(by_size[p].eps(x_t, abar, p, y), eps).cpu()
            return x0_from_eps(x_t, eps, abar)

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
        schedule=schedule_name(schedule),
        machine={
            "machine": first.machine,
            "padding": first.padding,
            "conditional": bool(conditional),
            "train_shape": list(first.images.shape),
            "train_sha256": first.fingerprint,
        },
        network=tag,
    )
