"""`ScoreMachine`: the IS, ES, LS and ELS machines of Kamb & Ganguli (2025) as denoisers (SPEC sections 1-2).

Every machine is one call of `elsfast.reduce.softmax_reduce` per group set (`elsfast.reduce.patches.group_sets`),
per class when class-conditional:

    IS   one group; keys and values are whole training images
    ES   IS over every circular translate of every training image (circular padding only)
    LS   one group per pixel; keys are the P x P patches at that pixel, values their centre pixels
    ELS  patches at every position (circular) or every position of the same border class (zero padding)

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`, `elsfast.reduce`, `elsfast.datasets`.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .common.checks import (
    check_abar,
    check_channels_first,
    check_device,
    check_finite_input,
    check_pixel_range,
    integer_labels,
    parse_memory_budget,
)
from .common.fingerprint import training_set_sha256
from .common.modules import CheckedDeviceModule
from .common.provenance import Provenance
from .reduce import DEFAULT_MEMORY_BUDGET, ImageDictionary, PatchDictionary, Reduction, clear_caches, softmax_reduce
from .reduce.budget import query_slices
from .reduce.caches import content_hash
from .reduce.collectives import check_same_call, timed
from .reduce.patches import PADDINGS, extract_patches, group_sets
from .reduce.registry import BackendSpec, backend_from_spec, backend_spec, check_backend_name

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MACHINES", "MachineStats", "ScoreMachine"]

CONFIG_NAME = "elsfast_machine.json"
CONFIG_FORMAT = "elsfast-machine/1"
STATE_FORMAT = "elsfast-machine-state/1"
TRAINING_SET_IN_STATE = ("value", "reference")

MACHINES = ("is", "es", "ls", "els")
DICTIONARIES = ("same", "valid")


@dataclass
class MachineStats:
    """What the last `denoise` call did (or, as `total_stats`, every call): `backends`, the backends that ran;
    `group_backends`, how many reductions' groups ran on each backend or combination (`"topk+cpu"`: a group
    whose queries ran partly on top-k, partly on its exact fallback); dictionary `chunks` streamed; `pairs`,
    the query-entry pairs actually scored, and `exact_pairs`, those of the exact problem (more where a backend
    skipped work: dedup's distinct keys, top-k); `queries` reduced, how many of them an approximate backend
    (top-k) answered, and the largest certified neglected posterior mass among those (0.0 when none; NaN when
    uncertified, HNSW). With a process group (a sharded dictionary) the counts cover the whole dictionary: the
    chunks, pairs and exact pairs of all `ranks` summed, `group_backends` summed over ranks, `backends` their
    union; `queries` are every rank's (the same queries)."""

    backends: set[str] = field(default_factory=set)
    group_backends: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    pairs: int = 0
    exact_pairs: int = 0
    queries: int = 0
    approximate_queries: int = 0
    max_neglected: float = 0.0
    ranks: int = 1

    @classmethod
    def across_ranks(cls, shards: Sequence[MachineStats]) -> MachineStats:
        """The stats of one call over a sharded dictionary from each rank's stats of it (see the class)."""
        whole = cls(queries=shards[0].queries, ranks=sum(s.ranks for s in shards))
        for s in shards:
            whole._add_work(s)
        return whole

    def merge_(self, other: MachineStats) -> MachineStats:
        """Add the stats of another call (`total_stats`); returns self."""
        self._add_work(other)
        self.queries += other.queries
        self.ranks = max(self.ranks, other.ranks)
        return self

    def _add_work(self, other: MachineStats) -> None:
        """Add what `other` ran and scored (backends, groups, chunks, pairs, approximate queries, worst mass)."""
        self.backends |= other.backends
        for name, count in other.group_backends.items():
            self.group_backends[name] = self.group_backends.get(name, 0) + count
        self.chunks += other.chunks
        self.pairs += other.pairs
        self.exact_pairs += other.exact_pairs
        self.approximate_queries += other.approximate_queries
        self._note_neglected(other.max_neglected)

    def _note_neglected(self, worst: float) -> None:
        """Keep the largest neglected mass; NaN (uncertified) wins over any number."""
        self.max_neglected = worst if math.isnan(worst) else max(self.max_neglected, worst)

    def add(self, result: Reduction) -> None:
        """Account for one reduction."""
        self.backends.update(result.backend.split("+") if result.group_backends else ())
        for name in result.group_backends:
            self.group_backends[name] = self.group_backends.get(name, 0) + 1
        self.chunks += result.chunks
        self.pairs += result.pairs
        self.exact_pairs += result.exact_pairs
        self.queries += result.values.shape[0] * result.values.shape[1]
        if result.neglected is not None and result.approximate_queries:
            self.approximate_queries += result.approximate_queries
            self._note_neglected(float(result.neglected.max()))


def _shard_offset(size: int, group: ProcessGroup, device: torch.device) -> int:
    """Total size of the shards of the ranks below this one (collective; NCCL needs `device` to be a GPU)."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(torch.distributed.get_world_size(group))]
    timed(
        "the shard sizes (all_gather)",
        torch.distributed.all_gather,
        sizes,
        torch.tensor([size], device=device),
        group=group,
    )
    return int(sum(s.item() for s in sizes[: torch.distributed.get_rank(group)]))


def _after_load(machine: ScoreMachine, incompatible) -> None:
    """`load_state_dict` post-hook: the training set may have been replaced in place, so what was derived from it
    (the SHA-256, the per-class subsets) is forgotten and the new images are checked. The reduction's caches
    (`elsfast.reduce.caches`) are keyed by content hash and tensor version, so they follow by themselves."""
    machine._fingerprint = None
    machine._classes.clear()
    if machine.images.is_floating_point():
        check_pixel_range(machine.images, "the loaded training images")


def _check_patch_size(patch_size: int) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Real | torch.Tensor):
        raise TypeError(f"patch_size must be an odd positive integer, got {patch_size!r}")
    if isinstance(patch_size, torch.Tensor) and patch_size.numel() != 1:
        raise ValueError(
            f"patch_size must be one odd positive integer, got a tensor of shape {tuple(patch_size.shape)}"
        )
    if not math.isfinite(float(patch_size)) or int(patch_size) != patch_size:
        raise ValueError(f"patch_size must be an odd positive integer, got {patch_size!r}")
    patch_size = int(patch_size)
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be an odd positive integer, got {patch_size}")
    return patch_size


class ScoreMachine(CheckedDeviceModule):
    """An analytic denoiser `D(x_t, abar) = E[x_0 | x_t]` over a training set.

    Args:
        train_images: `[N, C, H, W]` float in [-1, 1], or uint8 (mapped by u / 127.5 - 1). Kept as given (uint8
            stays uint8); patches are built from it chunk by chunk.
        train_labels: optional `[N]` integer labels, needed for class-conditional calls.
        machine: "is", "es", "ls" or "els".
        padding: "zeros" or "circular": how patches at the border are completed (ES needs "circular").
        backend: reduction backend name or "auto" (see `elsfast.reduce.backend_names()`), or a configured backend
            such as `elsfast.TopK(k=128, tolerance=1e-4)`.
        device: where the training set lives and the computation runs (default: the images' device).
        memory_budget: bytes of working memory per reduction (a positive int, or a string such as "512M" or
            "2G"); sets the dictionary chunk sizes.
        dtype: compute dtype, torch.float32 (default) or torch.float64.
        process_group: shard the dictionary across the ranks of this torch.distributed group (the default group
            is `torch.distributed.group.WORLD`): each rank passes its own shard of the training set, calls
            `denoise` with the same arguments, and gets the exact result over the union of all shards.
        image_offset: index of this shard's first image in the full training set (names sources in provenance);
            by default 0, or with a process group the total size of the shards of lower ranks.
        dictionary: ELS only. "same" (default): the paper's dictionary (App. B.1, eqs. 37-40), every patch at every
            centre of the padded training images (zero padding: of the query pixel's border class). "valid": only
            the (H-P+1)(W-P+1) patches lying fully inside each training image, one dictionary shared by every pixel,
            as in the authors' published code (queries are still padded per `padding`); for reproducing numbers
            computed with it (SPEC section 4).

    A `torch.nn.Module`: the training images and labels are its buffers `images` and `labels` (None when
    unconditional), so `.to(device / dtype)`, `.cuda()`, `.cpu()`, `.double()`, `.float()` move or convert them in
    place and return the machine (uint8 images and the labels keep their dtype; a dtype other than float32 or
    float64, `.half()` included, is refused), and `state_dict()` / `load_state_dict()` carry the training set:
    by value (the buffers) by default, or by reference for a machine built by `from_dataset` (see
    `state_dict_training_set`). Calling the machine is `denoise`. `copy.copy(machine)` is a machine sharing this
    one's training-set tensors whose conversions leave this one as it is (what the adapters convert).
    """

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor | Sequence[int] | None = None,
        *,
        machine: str = "els",
        padding: str = "zeros",
        backend: BackendSpec = "auto",
        device: torch.device | str | None = None,
        memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
        dtype: torch.dtype = torch.float32,
        process_group: ProcessGroup | None = None,
        image_offset: int | None = None,
        dictionary: str = "same",
    ) -> None:
        super().__init__()
        if machine not in MACHINES:
            raise ValueError(f"unknown machine {machine!r}; known: {', '.join(MACHINES)}")
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; known: {', '.join(PADDINGS)}")
        if dictionary not in DICTIONARIES:
            raise ValueError(f"unknown dictionary {dictionary!r}; known: {', '.join(DICTIONARIES)}")
        if dictionary == "valid" and machine != "els":
            raise ValueError(f"dictionary='valid' is an option of the ELS machine, not of {machine!r}")
        if machine == "es" and padding == "zeros":
            raise ValueError(
                "the ES machine is defined by circular translations; with zero padding it reduces to IS: "
                "use machine='is', or padding='circular' for ES"
            )
        check_backend_name(backend)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        memory_budget = parse_memory_budget(memory_budget)
        device = check_device(device)
        if not isinstance(train_images, torch.Tensor) or train_images.dim() != 4:
            shape = tuple(train_images.shape) if isinstance(train_images, torch.Tensor) else type(train_images)
            raise ValueError(f"train_images must be a tensor [N, C, H, W], got {shape}")
        check_channels_first(train_images, "train_images")
        if train_images.shape[0] == 0:
            raise ValueError("train_images is empty: the dictionary needs at least one image")
        if train_images.dtype != torch.uint8:
            if not train_images.is_floating_point():
                raise ValueError(f"train_images must be uint8 or float, got {train_images.dtype}")
            check_pixel_range(train_images, "train_images")
            train_images = train_images.to(dtype)
        self.device = torch.device(device) if device is not None else train_images.device
        self.register_buffer("images", train_images.to(self.device).contiguous())
        labels = None
        if train_labels is not None:
            labels = torch.as_tensor(train_labels)
            if labels.dim() != 1 or labels.shape[0] != self.images.shape[0]:
                raise ValueError(f"train_labels must have shape [{self.images.shape[0]}], got {tuple(labels.shape)}")
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise ValueError(f"train_labels must be integers, got {labels.dtype}")
            labels = integer_labels(labels, "train_labels").to(self.images.device)
        self.register_buffer("labels", labels)
        self._training_set_in_state = "value"
        self.register_load_state_dict_post_hook(_after_load)
        self.machine, self.padding, self.backend = machine, padding, backend
        self.dictionary = dictionary
        self.memory_budget, self.dtype = int(memory_budget), dtype
        self.last_stats = MachineStats()
        self.total_stats = MachineStats()  # accumulated over every call since construction
        self.process_group = process_group
        if image_offset is None:
            image_offset = 0 if process_group is None else _shard_offset(len(self.images), process_group, self.device)
        self.image_ids = torch.arange(self.images.shape[0]) + int(image_offset)
        self._classes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fingerprint: str | None = None
        self.source: dict | None = None  # the dataset reference, when built by from_dataset

    @classmethod
    def from_dataset(
        cls,
        name: str,
        *,
        split: str = "train",
        root: str | Path | None = None,
        pad_to: int | None = None,
        limit: int | None = None,
        conditional: bool = True,
        state_dict_training_set: str = "value",
        **kwargs,
    ) -> ScoreMachine:
        """A machine over a dataset of `elsfast.datasets.load` (with its labels unless `conditional=False`);
        the dataset reference is kept in `config()` so `save_pretrained` can record it.
        `state_dict_training_set`: "value" (the images in `state_dict()`) or "reference" (only the reference and
        the SHA-256); see the property of that name."""
        from . import datasets

        data = datasets.load(name, split=split, root=root, pad_to=pad_to, limit=limit)
        m = cls(data.images, data.labels if conditional else None, **kwargs)
        m.source = {"dataset": name, "split": split, "pad_to": pad_to, "limit": limit}
        m.state_dict_training_set = state_dict_training_set
        return m

    @property
    def state_dict_training_set(self) -> str:
        """How `state_dict()` holds the training set. "value" (default): the buffers `images` and `labels`, so
        `load_state_dict` replaces the training set by the saved one (of the same shape: torch's rule).
        "reference" (a machine built by `from_dataset` only): the buffers are not saved (non-persistent); the
        dataset reference and the training set's SHA-256 are (in the `_extra_state` entry, as in every state),
        and `load_state_dict` checks that this machine holds that training set (ValueError otherwise): load such
        a state into a machine built by `from_dataset` with `state_dict_training_set="reference"` (or with
        `strict=False`)."""
        return self._training_set_in_state

    @state_dict_training_set.setter
    def state_dict_training_set(self, how: str) -> None:
        if how not in TRAINING_SET_IN_STATE:
            raise ValueError(f"state_dict_training_set must be 'value' or 'reference', got {how!r}")
        if how == "reference" and self.source is None:
            raise ValueError(
                "state_dict_training_set='reference' needs a dataset reference, and this machine was built from "
                "tensors: build it with ScoreMachine.from_dataset, or keep 'value'"
            )
        self._training_set_in_state = how
        for name in ("images", "labels"):
            self.register_buffer(name, getattr(self, name), persistent=how == "value")

    def get_extra_state(self) -> dict:
        """The `_extra_state` entry of `state_dict()`: how the training set is held ("value" or "reference"), its
        dataset reference (`source`, None for a machine built from tensors), its SHA-256 and the images' dtype."""
        return {
            "format": STATE_FORMAT,
            "training_set": self._training_set_in_state,
            "source": self.source,
            "train_sha256": self.fingerprint,
            "train_dtype": str(self.images.dtype).removeprefix("torch."),
        }

    def set_extra_state(self, state: dict) -> None:
        """Read the `_extra_state` entry of a state (after the buffers were loaded): a state by value brings its
        dataset reference along with its images; a state by reference must name the training set this machine
        holds (its SHA-256, with the images in the saved dtype)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not the state of an elsfast ScoreMachine (extra state {state!r:.80})")
        if state["training_set"] == "value":
            self.source = state["source"]
            return
        saved_dtype = getattr(torch, state["train_dtype"])
        if saved_dtype == self.images.dtype:
            digest = self.fingerprint
        else:  # the same images, held here in another float dtype: compare them as they were saved
            digest = training_set_sha256(self.images.to(saved_dtype), self.labels)
        if digest != state["train_sha256"]:
            raise ValueError(
                f"the state refers to the training set {state['source']} with SHA-256 {state['train_sha256'][:12]}..., "
                f"but this machine holds another ({digest[:12]}...): build it with ScoreMachine.from_dataset from "
                "that reference"
            )

    def _apply(self, fn, recurse: bool = True):
        # every nn.Module conversion (.to, .cuda, .cpu, .double, .float) goes through _apply: see what it makes of a
        # float tensor of the machine's kind first, refuse a dtype the machine cannot compute in before anything
        # moves, then convert the buffers and follow with the machine's device and dtype
        probe = fn(torch.empty(0, device=self.images.device, dtype=self.dtype))
        if probe.is_floating_point() and probe.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {probe.dtype}")
        before = (self.images.device, self.images.dtype)
        super()._apply(fn, recurse)
        if self.images.device != before[0]:
            self.device = self.images.device
        if probe.is_floating_point():
            self.dtype = probe.dtype
        if self.images.dtype != before[1]:
            self._fingerprint = None  # the SHA-256 covers the images' bytes, which changed with their dtype
        self._classes.clear()
        return self

    def __copy__(self) -> ScoreMachine:
        """A machine of the same configuration holding the same training-set tensors (not copies), backend and
        process group, with its own buffer table, caches and statistics: `.to()` on it leaves this one as it is."""
        shared = [*self.buffers(), self.image_ids, self.backend, self.process_group]
        shared += [t for subset in self._classes.values() for t in subset]
        memo = {id(obj): obj for obj in shared if obj is not None}
        return copy.deepcopy(self, memo)

    def forward(
        self,
        x: torch.Tensor,
        abar: float,
        patch_size: int = 3,
        labels: torch.Tensor | Sequence[int] | None = None,
        *,
        return_provenance: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, Provenance]:
        """`denoise` (calling the machine as a module)."""
        return self.denoise(x, abar, patch_size, labels, return_provenance=return_provenance)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the training images and labels (computed once): identifies the training set."""
        if self._fingerprint is None:
            self._fingerprint = training_set_sha256(self.images, self.labels)
        return self._fingerprint

    def config(self) -> dict:
        """The machine's parameters and a reference to its training set (not the data), JSON-ready."""
        return {
            "format": CONFIG_FORMAT,
            "machine": self.machine,
            "padding": self.padding,
            "dictionary": self.dictionary,
            "backend": backend_spec(self.backend),
            "memory_budget": self.memory_budget,
            "dtype": str(self.dtype).removeprefix("torch."),
            "train_shape": list(self.images.shape),
            "train_dtype": str(self.images.dtype).removeprefix("torch."),
            "conditional": self.labels is not None,
            "train_sha256": self.fingerprint,
            "source": self.source,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config()` to `directory/elsfast_machine.json` (atomically) and return its path."""
        from .common.fileio import atomic_write

        path = Path(directory) / CONFIG_NAME
        text = json.dumps(self.config(), indent=2).encode()
        return atomic_write(path, lambda f: f.write(text))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        train_images: torch.Tensor | None = None,
        train_labels: torch.Tensor | None = None,
        root: str | Path | None = None,
        device: torch.device | str | None = None,
    ) -> ScoreMachine:
        """Rebuild a machine saved by `save_pretrained` (a directory or the json file). The training set is
        reloaded from the recorded dataset reference (`root` as for `datasets.load`) unless `train_images` are
        given; either way it must match the recorded SHA-256."""
        path = Path(path)
        config = json.loads((path / CONFIG_NAME if path.is_dir() else path).read_text())
        try:
            return cls.from_config(
                config, train_images=train_images, train_labels=train_labels, root=root, device=device
            )
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_config(
        cls,
        config: dict,
        *,
        train_images: torch.Tensor | None = None,
        train_labels: torch.Tensor | None = None,
        root: str | Path | None = None,
        device: torch.device | str | None = None,
    ) -> ScoreMachine:
        """Rebuild a machine from `config()` (as `from_pretrained` does from the saved json)."""
        if config.get("format") != CONFIG_FORMAT:
            raise ValueError(f"not an elsfast machine config (format {config.get('format')!r})")
        kwargs = {
            "machine": config["machine"],
            "padding": config["padding"],
            "dictionary": config.get("dictionary", "same"),
            "backend": backend_from_spec(config["backend"]),
            "memory_budget": config["memory_budget"],
            "dtype": getattr(torch, config["dtype"]),
            "device": device,
        }
        if train_images is None:
            if config["source"] is None:
                raise ValueError("the config records no dataset: pass train_images= (and train_labels=)")
            source = dict(config["source"])
            name = source.pop("dataset")
            m = cls.from_dataset(name, root=root, conditional=config["conditional"], **source, **kwargs)
        else:
            m = cls(train_images, train_labels, **kwargs)
        if m.fingerprint != config["train_sha256"]:
            raise ValueError(
                f"the training set differs from the saved one (SHA-256 {m.fingerprint[:12]}... "
                f"instead of {config['train_sha256'][:12]}...)"
            )
        return m

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the training images."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (
            f"ScoreMachine(machine={self.machine!r}, padding={self.padding!r}, backend={self.backend!r}, "
            f"train={n}x{c}x{h}x{w}, conditional={self.labels is not None}, device={self.device})"
        )

    def clear_cache(self) -> int:
        """Drop what this machine cached: its per-class training subsets, and every in-memory table or index
        derived from its training images (`elsfast.reduce.caches`); returns how many entries were dropped. Disk
        caches are left alone."""
        image_sets = [self.images, *(images for _, images in self._classes.values())]
        self._classes.clear()
        return sum(clear_caches(content_hash(images)) for images in image_sets)

    def class_subset(self, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training-set ids `[N_c]` and images `[N_c, C, H, W]` of one class (cached). With a process group
        this is the local shard's part; the class must have images on some rank. Collective then."""
        if label not in self._classes:
            index = (self.labels == label).nonzero().flatten()
            count = torch.tensor([index.numel()], device=self.device)
            if self.process_group is not None:
                timed("the class sizes (all_reduce)", torch.distributed.all_reduce, count, group=self.process_group)
            if count.item() == 0:
                raise ValueError(f"class {label} has no training images: its dictionary would be empty")
            self._classes[label] = (self.image_ids[index.cpu()], self.images[index.to(self.images.device)])
        return self._classes[label]

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a tensor [B, C, H, W], got {getattr(x, 'shape', type(x))}")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"x has shape [B, C, H, W] = {list(x.shape)} but the training images are "
                f"[C, H, W] = {list(self.image_shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a float tensor, got {x.dtype}")
        x = x.to(self.device, self.dtype)
        check_finite_input(x, "x")
        return x

    def _check_labels(self, labels: torch.Tensor | Sequence[int] | None, batch: int) -> torch.Tensor | None:
        if labels is None:
            return None
        if self.labels is None:
            raise ValueError("labels were given but the machine has no train_labels: pass train_labels=...")
        labels = integer_labels(labels, "labels")
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(f"labels must have shape [{batch}] (one per sample), got {tuple(labels.shape)}")
        return labels

    def _check_size(self, patch_size: int) -> int:
        """One rule for every padding: a patch of P = 2 max(H, W) - 1 covers the whole image wherever it is
        centred, and a larger P adds only padding. With zero padding that is zero features in every key and query:
        the same machine, so such P run at that size. With circular padding it is the same pixels wrapped in
        again, counted twice: no machine of its own, so such P are refused. IS and ES do not use P. The valid
        dictionary needs a patch that fits inside the image."""
        if self.dictionary == "valid" and patch_size > min(self.image_shape[1:]):
            raise ValueError(
                f"patch_size {patch_size} does not fit inside the {self.image_shape[1]} x {self.image_shape[2]} "
                "training images: dictionary='valid' holds only patches that lie fully inside them"
            )
        largest = 2 * max(self.image_shape[1:]) - 1
        if self.machine in ("is", "es") or patch_size <= largest:
            return patch_size
        if self.padding == "zeros":
            return largest
        raise ValueError(
            f"patch_size {patch_size} is larger than 2 max(H, W) - 1 = {largest} for {self.image_shape[1]} x "
            f"{self.image_shape[2]} images: with circular padding a larger patch only wraps the same pixels in "
            f"again; use patch_size <= {largest}"
        )

    def denoise(
        self,
        x: torch.Tensor,
        abar: float,
        patch_size: int = 3,
        labels: torch.Tensor | Sequence[int] | None = None,
        *,
        return_provenance: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, Provenance]:
        """The machine's `E[x_0 | x_t = x]` for a batch `x` `[B, C, H, W]` at noise level `abar` in (0, 1).

        `patch_size` must be an odd positive integer for every machine; IS and ES do not use it. From
        P = 2 max(H, W) - 1 on a patch covers the whole image from every centre: with zero padding, LS and ELS
        give the same result for every larger P and run it at that size; with circular padding a larger P is
        refused (it would wrap the same pixels in again). The batch runs in slices whose query patches fit in
        `memory_budget` (at least one sample; see `elsfast.reduce.budget`).
        `labels` `[B]` (integers) restricts each sample's dictionary to the training images of its class.
        Computes in the machine's dtype on its device; returns `[B, C, H, W]` in the dtype and on the device of
        `x` (`[0, C, H, W]` for an empty batch), as torch modules do; with
        `return_provenance`, also each pixel's dominant dictionary entry and posterior entropy (`Provenance`).
        """
        abar = check_abar(abar)
        given = x
        x = self._check_x(x)
        patch_size = self._check_size(_check_patch_size(patch_size))
        labels = self._check_labels(labels, x.shape[0])
        if self.process_group is not None:  # every rank must reduce the same queries: else their answers blend
            kind = f"{self.machine} {self.padding} {self.dictionary} {self.dtype} {list(self.image_shape)}"
            check_same_call(self.process_group, self.device, x, abar, patch_size, labels, kind)
        self.last_stats = MachineStats()
        if x.shape[0] == 0:
            if not return_provenance:
                return given.clone()
            index = torch.zeros(0, *self.image_shape[1:], dtype=torch.int64, device=x.device)
            real = torch.zeros(index.shape, dtype=x.dtype, device=x.device)
            return given.clone(), Provenance(index, index.clone(), index.clone(), real, real.clone())
        if labels is None:
            out, prov = self._denoise(x, self.images, self.image_ids, abar, patch_size, return_provenance)
        else:
            out = torch.empty_like(x)
            parts, part_rows = [], []
            for label in labels.unique().tolist():
                rows = (labels == label).nonzero().flatten().to(x.device)
                ids, images = self.class_subset(label)
                out[rows], prov = self._denoise(x[rows], images, ids, abar, patch_size, return_provenance)
                if return_provenance:
                    parts.append(prov)
                    part_rows.append(rows)
            prov = Provenance.cat(parts, part_rows, x.shape[0]) if return_provenance else None
        if self.process_group is not None:  # one collective per call: the stats of the whole dictionary
            shards: list[MachineStats | None] = [None] * torch.distributed.get_world_size(self.process_group)
            torch.distributed.all_gather_object(shards, self.last_stats, group=self.process_group)
            self.last_stats = MachineStats.across_ranks(shards)
        self.total_stats.merge_(self.last_stats)
        out = out.to(given.device, given.dtype)  # computed in the machine's dtype, returned in the input's
        return (out, prov) if return_provenance else out

    def eps(self, x: torch.Tensor, abar: float, patch_size: int = 3, labels=None) -> torch.Tensor:
        """Noise prediction `(x - sqrt(abar) D) / sqrt(1 - abar)`, same arguments as `denoise`."""
        d = self.denoise(x, abar, patch_size, labels)
        abar = float(abar)
        return (x.to(d) - math.sqrt(abar) * d) / math.sqrt(1.0 - abar)

    def score(self, x: torch.Tensor, abar: float, patch_size: int = 3, labels=None) -> torch.Tensor:
        """Score `(sqrt(abar) D - x) / (1 - abar)`, same arguments as `denoise`."""
        d = self.denoise(x, abar, patch_size, labels)
        abar = float(abar)
        return (math.sqrt(abar) * d - x.to(d)) / (1.0 - abar)

    def _reduce(self, queries: torch.Tensor, dictionary, abar: float, provenance: bool) -> Reduction:
        result = softmax_reduce(
            queries,
            dictionary,
            abar=abar,
            backend=self.backend,
            memory_budget=self.memory_budget,
            provenance=provenance,
            process_group=self.process_group,
        )
        self.last_stats.add(result)
        return result

    def _groups(self, H: int, W: int, patch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The group sets as `(query positions (G, S), dictionary positions (G, S'))`: the same positions for every
        machine (each pixel's dictionary holds the patches centred where the group's pixels are), except the
        valid dictionary of ELS: one group of every pixel against the patches lying fully inside the images."""
        if self.dictionary == "valid":
            r = patch_size // 2
            inside = torch.arange(H * W).view(H, W)[r : H - r, r : W - r].reshape(1, -1)
            return [(torch.arange(H * W).view(1, H * W), inside)]
        return [(positions, positions) for positions in group_sets(H, W, patch_size, self.padding, self.machine)]

    def _denoise(
        self, x: torch.Tensor, images: torch.Tensor, ids: torch.Tensor, abar: float, patch_size: int, provenance: bool
    ) -> tuple[torch.Tensor, Provenance | None]:
        """Denoise `x` against the dictionary of `images`, whose training-set ids are `ids`."""
        B, C, H, W = x.shape
        if self.machine in ("is", "es"):
            dictionary = ImageDictionary(images, shifts=self.machine == "es", image_ids=ids)
            r = self._reduce(x.reshape(1, B, -1), dictionary, abar, provenance)
            out = r.values.reshape(B, C, H, W)
            if not provenance:
                return out, None
            # one softmax per sample: entry position s = the translate (u, v) for ES (S = H*W)
            image, shift = (t.view(B, 1, 1) for t in dictionary.decode_ids(r.best[0]))
            ys = torch.arange(H, device=x.device).view(1, H, 1)
            xs = torch.arange(W, device=x.device).view(1, 1, W)
            per_pixel = lambda t: t.view(B, 1, 1).expand(B, H, W)  # noqa: E731
            return out, Provenance(
                image.expand(B, H, W),
                ((ys + shift // W) % H).expand(B, H, W),
                ((xs + shift % W) % W).expand(B, H, W),
                per_pixel(r.weight[0]),
                per_pixel(r.entropy[0]),
            )
        out = torch.empty(B, C, H * W, dtype=x.dtype, device=x.device)
        fields = torch.empty(5, B, H * W, dtype=torch.float64, device=x.device) if provenance else None
        for positions, entries in self._groups(H, W, patch_size):
            G, S = positions.shape
            dictionary = PatchDictionary(images, patch_size, self.padding, entries, image_ids=ids)
            pixels = positions.flatten().to(x.device)
            for rows in query_slices(B, G * S * C * patch_size**2 * x.element_size(), self.memory_budget):
                b = rows.stop - rows.start
                queries = extract_patches(x[rows], patch_size, self.padding, positions).reshape(G, S * b, -1)
                r = self._reduce(queries, dictionary, abar, provenance)  # values (G, S * b, C), in (s, b) order
                out[rows, :, pixels] = r.values.reshape(G * S, b, C).permute(1, 2, 0).to(out.dtype)
                if provenance:
                    per_query = torch.stack([*dictionary.sources(r.best), r.weight, r.entropy])  # each (G, S * b)
                    fields[:, rows, pixels] = per_query.reshape(5, G * S, b).transpose(1, 2).double()
        out = out.reshape(B, C, H, W)
        if not provenance:
            return out, None
        fields = fields.view(5, B, H, W)
        index = fields[:3].long()
        return out, Provenance(index[0], index[1], index[2], fields[3].to(x.dtype), fields[4].to(x.dtype))
