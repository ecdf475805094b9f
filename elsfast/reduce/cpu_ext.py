"""The binding of the compiled CPU extension `elsfast._cpu` (csrc/cpu_bindings.cpp): its limits, its planning,
its typed calls and the `torch.library` custom ops they go through. The `cpu`, `dedup` and `shifts` backends
call this module, never each other.

The extension takes tensors and reads every size off their shapes (csrc/reduce_binding.h checks dtype, device,
contiguity and shape of each before a pointer reaches a kernel), so no integer can be passed in the wrong place.
The custom ops `elsfast::cpu_reduce` and `elsfast::cpu_reduce_shifts` allocate their outputs and have fake
(meta) implementations, so `torch.compile` traces through them as single opaque operations.
"""

from __future__ import annotations

import math

import torch

from .bounds import fma_logit_error, kernel_tolerance
from .dictionary import Dictionary
from .partials import (
    COMPILED_KERNEL_LIMITS,
    KernelInputs,
    compiled_kernel_reasons,
    empty_partial_states,
    fold_partial_states,
    import_extension,
    kernel_inputs,
    with_increasing_ids,
)
from .registry import Backend, Tolerance
from .state import ReduceState, logit_scales

__all__ = [
    "CPU_KERNEL_LIMITS",
    "EXTENSION",
    "ISAS",
    "MAX_SPLITS",
    "RUNNABLE_ISAS",
    "accuracy",
    "check_options",
    "choose_isa",
    "lanes",
    "plan",
    "reduce_dictionary",
    "reduce_partials",
    "reduce_shifts",
    "unsupported_reasons",
]

EXTENSION = import_extension("elsfast._cpu")  # the module, or the ImportError saying why it is missing
# The instruction sets this CPU runs the kernels with, narrowest first (asked once: torch.compile cannot trace it)
RUNNABLE_ISAS: tuple[str, ...] = () if isinstance(EXTENSION, ImportError) else tuple(EXTENSION.isas())
CHUNK_BYTES = 2 << 20  # packed key tiles shared by all threads: about an L2/L3 slice
MAX_SPLITS = 64
ISAS = ("auto", "avx2", "avx512")

CPU_KERNEL_LIMITS = {
    **COMPILED_KERNEL_LIMITS,
    "extension": "needs the compiled CPU extension elsfast._cpu",
    "isa": "needs a CPU instruction set the kernel was built for (AVX2 + FMA, or AVX-512F)",
    "device": "needs CPU tensors",
}


def choose_isa(isa: str) -> str | None:
    """The instruction set to run with for the option `isa` ("auto", "avx2", "avx512"), or None when this CPU has
    none that it allows (or the extension is missing)."""
    if isa == "auto":
        return RUNNABLE_ISAS[-1] if RUNNABLE_ISAS else None
    return isa if isa in RUNNABLE_ISAS else None


def check_options(backend: Backend, counts: tuple[str, ...]) -> None:
    """Raise ValueError unless each attribute in `counts` of a CPU-kernel backend is a positive integer or None and
    its `isa` is one of ISAS."""
    for name in counts:
        value = getattr(backend, name)
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if backend.isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {backend.isa!r}")


def unsupported_reasons(backend: Backend, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
    """Why the kernels of `elsfast._cpu` cannot run this problem with the `isa` option of `backend` (a backend
    whose `LIMITS` include `CPU_KERNEL_LIMITS`); empty: they can."""
    reasons = []
    if isinstance(EXTENSION, ImportError):
        reasons.append(
            backend.refuse(
                "extension",
                f"{EXTENSION}; reinstall with a C++ compiler with OpenMP (ELSFAST_CPU=1 makes a failed build an error)",
            )
        )
    elif choose_isa(backend.isa) is None:
        wanted = "AVX2 + FMA" if backend.isa in ("auto", "avx2") else "AVX-512F"
        reasons.append(backend.refuse("isa", f"this CPU lacks {wanted}; it has: {list(RUNNABLE_ISAS) or 'neither'}"))
    if queries.device.type != "cpu":
        reasons.append(backend.refuse("device", f"queries are on {queries.device.type}"))
    return reasons + compiled_kernel_reasons(backend, queries, dictionary)


def accuracy() -> Tolerance:
    """The kernel's float32 bound (`elsfast.reduce.bounds`): fp32 FMA logits, a tile's sums of at most 20 terms per
    path (256 entries over 16 AVX2 lanes, then the lanes' tree; 13 with AVX-512) and the Cephes exp2 (2^-21
    relative): (D/2 + 3) eps32 L + 3.0e-6 (docs/design.md)."""
    return kernel_tolerance(fma_logit_error(), tile_terms=20, exp2_relative=2.0**-21)


def plan(entries: int, D: int, E: int, M: int, threads: int, memory_budget: int) -> tuple[int, int]:
    """`(splits, tiles_per_chunk)` for `M` queries a group against `entries` entries of D features and E values:
    enough work units (query blocks x splits) for two per thread, at most one split per key tile; chunks of packed
    tiles of about `CHUNK_BYTES` (at most a quarter of the budget)."""
    tiles = math.ceil(entries / EXTENSION.TILE_N)
    blocks = math.ceil(M / EXTENSION.BLOCK_Q)
    splits = max(1, min(MAX_SPLITS, tiles, math.ceil(2 * threads / blocks)))
    tile_bytes = EXTENSION.TILE_N * (4 * (D + E + 1) + 8)
    per_chunk = max(1, min(tiles, min(CHUNK_BYTES, memory_budget // 4) // tile_bytes))
    return splits, per_chunk


def lanes(isa: str) -> int:
    """Training images a lane block of the displacement kernel holds under the runnable `isa`."""
    return EXTENSION.lanes(isa)


@torch.library.custom_op("elsfast::cpu_reduce", mutates_args=(), device_types="cpu")
def _cpu_reduce(
    q: torch.Tensor,
    images: torch.Tensor,
    key_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    image_bias: torch.Tensor | None,
    key_scale: float,
    splits: int,
    tiles_per_chunk: int,
    provenance: bool,
    threads: int,
    isa: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    G, M, _ = q.shape
    m, l, acc, best, u = empty_partial_states(splits, G, M, value_offsets.shape[2], q.device)
    EXTENSION.reduce(
        q=q,
        images=images,
        key_offsets=key_offsets,
        value_offsets=value_offsets,
        m=m,
        l=l,
        acc=acc,
        best=best,
        u=u,
        image_bias=image_bias,
        key_scale=key_scale,
        provenance=provenance,
        tiles_per_chunk=tiles_per_chunk,
        threads=threads,
        isa=isa,
    )
    return m, l, acc, best, u


@_cpu_reduce.register_fake
def _(q, images, key_offsets, value_offsets, image_bias, key_scale, splits, tiles_per_chunk, provenance, threads, isa):
    G, M, _ = q.shape
    return empty_partial_states(splits, G, M, value_offsets.shape[2], q.device)


@torch.library.custom_op("elsfast::cpu_reduce_shifts", mutates_args=(), device_types="cpu")
def _cpu_reduce_shifts(
    x: torch.Tensor,
    images: torch.Tensor,
    groups: torch.Tensor,
    queries_per_group: int,
    patch_size: int,
    q_scale: float,
    key_scale: float,
    splits: int,
    threads: int,
    isa: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, l, acc, _, _ = empty_partial_states(splits, groups.shape[0], queries_per_group, x.shape[1], x.device)
    EXTENSION.reduce_shifts(
        x=x,
        images=images,
        groups=groups,
        m=m,
        l=l,
        acc=acc,
        patch_size=patch_size,
        q_scale=q_scale,
        key_scale=key_scale,
        threads=threads,
        isa=isa,
    )
    return m, l, acc


@_cpu_reduce_shifts.register_fake
def _(x, images, groups, queries_per_group, patch_size, q_scale, key_scale, splits, threads, isa):
    m, l, acc, _, _ = empty_partial_states(splits, groups.shape[0], queries_per_group, x.shape[1], x.device)
    return m, l, acc


def reduce_partials(
    inputs: KernelInputs,
    *,
    splits: int,
    tiles_per_chunk: int,
    provenance: bool,
    threads: int,
    isa: str,
    image_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's per-split partial states `(m, l, acc, best, u)` (`partials.empty_partial_states`, fp32 sums)
    for `inputs` (`partials.KernelInputs`); `image_bias` None or `(N,)` fp32 bits added to the logits of each
    image's entries; `isa` a runnable instruction set (`choose_isa`)."""
    return torch.ops.elsfast.cpu_reduce(
        inputs.q,
        inputs.images,
        inputs.key_offsets,
        inputs.value_offsets,
        image_bias,
        inputs.key_scale,
        splits,
        tiles_per_chunk,
        provenance,
        threads,
        isa,
    )


def reduce_dictionary(
    queries: torch.Tensor,
    dictionary: Dictionary,
    *,
    abar: float,
    memory_budget: int,
    provenance: bool,
    threads: int,
    isa: str,
    splits: int | None = None,
    tiles_per_chunk: int | None = None,
) -> tuple[ReduceState, int]:
    """The folded state of queries `(G, M, D)` fp32 against a patch `dictionary` and the key chunks streamed;
    `splits`, `tiles_per_chunk` None: planned (`plan`); `isa` an option of ISAS that this CPU runs."""
    G, M, _ = queries.shape
    if provenance:  # ties go to the lowest local id: make it the lowest global id
        dictionary = with_increasing_ids(dictionary)
    planned = plan(dictionary.size, dictionary.key_dim, dictionary.value_dim, M, threads, memory_budget)
    splits, per_chunk = splits or planned[0], tiles_per_chunk or planned[1]
    m, l, acc, best, u = reduce_partials(
        kernel_inputs(queries, dictionary, abar),
        splits=splits,
        tiles_per_chunk=per_chunk,
        provenance=provenance,
        threads=threads,
        isa=choose_isa(isa),
    )
    state = fold_partial_states(dictionary, m, l, acc, best if provenance else None, u if provenance else None)
    return state, G * math.ceil(math.ceil(dictionary.size / EXTENSION.TILE_N) / per_chunk)


def reduce_shifts(
    images: torch.Tensor,
    dictionary: Dictionary,
    groups: torch.Tensor,
    *,
    queries_per_group: int,
    abar: float,
    splits: int,
    threads: int,
    isa: str,
) -> ReduceState:
    """The folded state of the displacement kernel: query images `(B, C, H + P - 1, W + P - 1)` fp32 zero-padded
    by P // 2 against the zero-padded patch `dictionary`, whose groups are the rectangles `groups` `(G, 4)` int32
    (first row, rows, first column, columns); `queries_per_group` = positions a group x B."""
    q_scale, key_scale = logit_scales(abar)
    train = dictionary.images.to(images.device).contiguous()
    m, l, acc = torch.ops.elsfast.cpu_reduce_shifts(
        images.contiguous(),
        train,
        groups.contiguous(),
        queries_per_group,
        dictionary.patch_size,
        q_scale,
        key_scale,
        splits,
        threads,
        choose_isa(isa),
    )
    return fold_partial_states(dictionary, m, l, acc, None, None)
