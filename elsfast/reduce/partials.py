"""What the fused kernels (Triton, CUDA, CPU) share: their inputs (scaled queries, images and pixel offset tables on the
queries' device), how a group's N*S entries are split across programs, and how the per-split partial states are
merged back exactly (`ReduceState.fold_`)."""

from __future__ import annotations

import importlib
import math
from dataclasses import replace
from types import ModuleType
from typing import NamedTuple

import torch

from .dictionary import Dictionary
from .state import ReduceState, logit_scales

__all__ = [
    "COMPILED_KERNEL_LIMITS",
    "MAX_VALUE_CHANNELS",
    "PROGRAMS_PER_SM",
    "KernelInputs",
    "compiled_kernel_reasons",
    "empty_partial_states",
    "fold_partial_states",
    "import_extension",
    "kernel_inputs",
    "plan_splits",
    "with_increasing_ids",
]

MAX_VALUE_CHANNELS = 4  # the compiled kernels (CPU, CUDA) hold a query's values in registers
PROGRAMS_PER_SM = 4  # programs (thread blocks) per streaming multiprocessor that keep a GPU busy
MAX_GRID_AXIS = 65535  # CUDA's limit on the y and z grid dimensions


class KernelInputs(NamedTuple):
    """q `(G, M, D)` fp32 queries in bits (q 2a/T log2 e); images `(N, C*H*W)`; key_offsets `(G, S, D)` and
    value_offsets `(G, S, E)` int32 (`Dictionary.pixel_offsets`), all contiguous on the queries' device;
    key_scale = a^2/T log2 e, so that a logit is q.k - key_scale |k|^2 bits."""

    q: torch.Tensor
    images: torch.Tensor
    key_offsets: torch.Tensor
    value_offsets: torch.Tensor
    key_scale: float


def kernel_inputs(queries: torch.Tensor, dictionary: Dictionary, abar: float) -> KernelInputs:
    """The inputs of a fused kernel for queries `(G, M, D)` against `dictionary` at noise level `abar`."""
    device = queries.device
    images = dictionary.images.to(device).reshape(dictionary.num_images, -1).contiguous()
    key_offsets, value_offsets = (t.to(device, torch.int32).contiguous() for t in dictionary.pixel_offsets())
    q_scale, key_scale = logit_scales(abar)
    return KernelInputs((queries * q_scale).contiguous(), images, key_offsets, value_offsets, key_scale)


def plan_splits(
    entries: int, tile: int, programs: int, device: torch.device, splits: int | None, *, sms: int | None = None
) -> tuple[int, int]:
    """`(splits, entries_per_split)` for a group of `entries` entries streamed in tiles of `tile`, when the other
    grid axes launch `programs` programs: `splits` itself if given, else enough to reach `PROGRAMS_PER_SM`
    programs per SM of a CUDA `device` (1 elsewhere; `sms` gives the SM count of a device that is not there, for
    the static cost tool); at most one split per tile, `entries_per_split` a multiple of `tile`, and no split
    empty."""
    tiles = max(1, math.ceil(entries / tile))
    if splits is None and sms is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    if splits is None:
        splits = math.ceil(PROGRAMS_PER_SM * sms / max(programs, 1))  # no queries (M = 0): one program's worth
    splits = max(1, min(splits, tiles, MAX_GRID_AXIS))
    per_split = math.ceil(tiles / splits) * tile
    return max(1, math.ceil(entries / per_split)), per_split


def import_extension(name: str) -> ModuleType | ImportError:
    """The compiled module `name` (`elsfast._cpu`, `elsfast._cuda`), or the ImportError saying why it is missing."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        return error


COMPILED_KERNEL_LIMITS = {
    "float32": "computes in float32 (float64 runs on torch)",
    "image_dtype": "needs uint8 or float32 training images",
    "value_channels": f"holds at most {MAX_VALUE_CHANNELS} value channels (IS/ES run on torch)",
}


def compiled_kernel_reasons(backend, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
    """What the compiled kernels (CPU, CUDA) cannot run: float64, other image dtypes, more than
    `MAX_VALUE_CHANNELS` value channels (whole-image dictionaries); reasons from `backend.refuse`, whose
    `LIMITS` include `COMPILED_KERNEL_LIMITS`."""
    reasons = []
    if queries.dtype != torch.float32:
        reasons.append(backend.refuse("float32", f"queries are {queries.dtype}"))
    if dictionary.images.dtype not in (torch.uint8, torch.float32):
        reasons.append(backend.refuse("image_dtype", f"got {dictionary.images.dtype}"))
    if dictionary.value_dim > MAX_VALUE_CHANNELS:
        reasons.append(backend.refuse("value_channels", f"values of {dictionary.value_dim} channels"))
    return reasons


def empty_partial_states(
    splits: int, G: int, M: int, E: int, device: torch.device, sums: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised outputs of a compiled kernel, `(m, l, acc, best, u)`: m fp32 `(splits, G, M)`, l and u
    `(splits, G, M)` and acc `(splits, G, M, E)` in `sums` (the CUDA kernel's are float64), best int64; the kernel
    writes every element (best and u only with provenance)."""
    m = torch.empty(splits, G, M, dtype=torch.float32, device=device)
    l = torch.empty(splits, G, M, dtype=sums, device=device)
    acc = torch.empty(splits, G, M, E, dtype=sums, device=device)
    best = torch.empty(splits, G, M, dtype=torch.int64, device=device)
    return m, l, acc, best, torch.empty_like(l)


def fold_partial_states(
    dictionary: Dictionary,
    m: torch.Tensor,
    l: torch.Tensor,
    acc: torch.Tensor,
    best: torch.Tensor | None,
    u: torch.Tensor | None,
) -> ReduceState:
    """Merge a kernel's per-split partial states (leading axis: splits; m, l, u `(K, G, M)`, acc `(K, G, M, E)`)
    after turning the local ids of `best` (`n * S + s`, n the row in `dictionary.images`) into the dictionary's ids
    (`image_ids[n] * S + s`), so that the merge's tie rule (the lowest id among equal maxima) compares global ids.

    The merge runs in float64 (the splits can be hundreds: fp32 merges would add a rounding per level); the state
    it returns is in m's dtype (the queries' float32), rounded once."""
    if best is not None:
        best = dictionary.global_ids(best)
    return ReduceState(m, l, acc, best, u).astype(torch.float64).fold_().astype(m.dtype)


def with_increasing_ids(dictionary: Dictionary) -> Dictionary:
    """`dictionary`, or the same dictionary with its images in increasing order of `image_ids` where they are not:
    a kernel breaks ties between equal logits by the lowest local id `n * S + s` (n the row in the images), which
    is the lowest global id `image_ids[n] * S + s` exactly when the ids increase with n (as machines build them)."""
    ids = dictionary.image_ids
    if ids is None or ids.numel() < 2 or bool((ids[1:] > ids[:-1]).all()):
        return dictionary
    order = torch.argsort(ids)
    return replace(dictionary, images=dictionary.images[order.to(dictionary.images.device)], image_ids=ids[order])
