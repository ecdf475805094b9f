"""CPU backend: the compiled kernel `elsfast._cpu` (csrc/cpu_reduce.cpp): keys packed from the training images chunk
by chunk, a register-tiled AVX2 + FMA or AVX-512 distance micro-kernel fused with a vectorised exp2 online softmax
(fp32 logits, fp64 running sums), OpenMP threads over query blocks and dictionary splits, the per-split states
merged exactly with `ReduceState.fold_`.

Patch dictionaries (LS, ELS; values of at most 4 channels) on CPU tensors, float32, on x86-64 CPUs with AVX2 and
FMA (AVX-512F where the CPU has it). Built by setup.py wherever a C++ compiler with OpenMP is found
(`ELSFAST_CPU=1` makes a failed build an error, `0` skips it). IS, ES and float64 run on the torch backend.
Running sums are fp64, so the result is as accurate as its fp32 logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..common.threads import kernel_threads
from .bounds import fma_logit_error, kernel_tolerance
from .dictionary import Dictionary
from .partials import (
    COMPILED_KERNEL_LIMITS,
    compiled_kernel_reasons,
    empty_partial_states,
    extension_arguments,
    fold_partial_states,
    import_extension,
    kernel_inputs,
    with_increasing_ids,
)
from .registry import Backend, BackendOutput, Tolerance, register_backend

__all__ = ["CPU_KERNEL_LIMITS", "Cpu", "check_options", "choose_isa", "cpu_kernel_reasons"]

CHUNK_BYTES = 2 << 20  # packed key tiles shared by all threads: about an L2/L3 slice
MAX_SPLITS = 64
ISAS = ("auto", "avx2", "avx512")


def choose_isa(ext, isa: str) -> str | None:
    """The instruction set to run with for the option `isa` ("auto", "avx2", "avx512"), or None when this CPU has
    none that it allows. `ext`: the compiled module."""
    available = ext.isas()
    if isa == "auto":
        return available[-1] if available else None
    return isa if isa in available else None


def check_options(backend: Backend, counts: tuple[str, ...]) -> None:
    """Raise ValueError unless each attribute in `counts` of a CPU-kernel backend is a positive integer or None and
    its `isa` is one of ISAS."""
    for name in counts:
        value = getattr(backend, name)
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if backend.isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {backend.isa!r}")


CPU_KERNEL_LIMITS = {
    **COMPILED_KERNEL_LIMITS,
    "extension": "needs the compiled CPU extension elsfast._cpu",
    "isa": "needs a CPU instruction set the kernel was built for (AVX2 + FMA, or AVX-512F)",
    "device": "needs CPU tensors",
}


def cpu_kernel_reasons(backend: Backend, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
    """Why the kernels of `elsfast._cpu` cannot run this problem with the `isa` option of `backend` (a backend
    whose `LIMITS` include `CPU_KERNEL_LIMITS`); empty: they can."""
    reasons = []
    ext = import_extension("elsfast._cpu")
    if isinstance(ext, ImportError):
        reasons.append(
            backend.refuse(
                "extension",
                f"{ext}; reinstall with a C++ compiler with OpenMP (ELSFAST_CPU=1 makes a failed build an error)",
            )
        )
    elif choose_isa(ext, backend.isa) is None:
        wanted = "AVX2 + FMA" if backend.isa in ("auto", "avx2") else "AVX-512F"
        reasons.append(backend.refuse("isa", f"this CPU lacks {wanted}; it has: {ext.isas() or 'neither'}"))
    if queries.device.type != "cpu":
        reasons.append(backend.refuse("device", f"queries are on {queries.device.type}"))
    return reasons + compiled_kernel_reasons(backend, queries, dictionary)


def plan(ext, entries: int, D: int, E: int, M: int, threads: int, memory_budget: int) -> tuple[int, int]:
    """`(splits, tiles_per_chunk)` for `M` queries a group against `entries` entries of D features and E values:
    enough work units (query blocks x splits) for two per thread, at most one split per key tile; chunks of packed
    tiles of about `CHUNK_BYTES` (at most a quarter of the budget). `ext`: the compiled module (its tile and
    block sizes)."""
    tiles = math.ceil(entries / ext.TILE_N)
    blocks = math.ceil(M / ext.BLOCK_Q)
    splits = max(1, min(MAX_SPLITS, tiles, math.ceil(2 * threads / blocks)))
    tile_bytes = ext.TILE_N * (4 * (D + E + 1) + 8)
    per_chunk = max(1, min(tiles, min(CHUNK_BYTES, memory_budget // 4) // tile_bytes))
    return splits, per_chunk


@register_backend
@dataclass(frozen=True)
class Cpu(Backend):
    """The compiled CPU kernel (csrc/cpu_reduce.cpp), for patch dictionaries on CPU tensors.

    Args:
        splits: partial states per query (key tile t of a chunk folds into split t % splits); None: enough work
            units for two per thread (`torch.get_num_threads()`).
        tiles_per_chunk: key tiles of 256 entries packed at once and shared by the threads; None: about 2 MB.
        isa: "auto" (the widest this CPU runs: AVX-512 over AVX2), "avx2" or "avx512".
    """

    splits: int | None = None
    tiles_per_chunk: int | None = None
    isa: str = "auto"

    NAME = "cpu"
    LIMITS = CPU_KERNEL_LIMITS

    def __post_init__(self) -> None:
        check_options(self, ("splits", "tiles_per_chunk"))

    def options(self) -> dict:
        return {"splits": self.splits, "tiles_per_chunk": self.tiles_per_chunk, "isa": self.isa}

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """float32: the bound of `elsfast.reduce.bounds` for fp32 FMA logits, a tile's sums of at most 20 terms per
        path (256 entries over 16 AVX2 lanes, then the lanes' tree; 13 with AVX-512) and the Cephes exp2 (2^-21
        relative): (D/2 + 3) eps32 L + 3.0e-6 (docs/design.md). The yardstick `auto` holds the GPU kernels to."""
        if dtype == torch.float32:
            return kernel_tolerance(fma_logit_error(), tile_terms=20, exp2_relative=2.0**-21)
        return super().accuracy(dtype)

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        return cpu_kernel_reasons(self, queries, dictionary)

    @torch._dynamo.disable  # a kernel called with raw pointers: a graph break for torch.compile, never traced
    def reduce(
        self,
        queries: torch.Tensor,
        dictionary: Dictionary,
        *,
        abar: float,
        memory_budget: int,
        provenance: bool = False,
    ) -> BackendOutput:
        ext = import_extension("elsfast._cpu")
        G, M, _ = queries.shape
        threads = kernel_threads()
        if provenance:
            dictionary = with_increasing_ids(dictionary)
        splits, per_chunk = plan(
            ext, dictionary.size, dictionary.key_dim, dictionary.value_dim, M, threads, memory_budget
        )
        splits, per_chunk = self.splits or splits, self.tiles_per_chunk or per_chunk
        inputs = kernel_inputs(queries, dictionary, abar)
        E = dictionary.value_dim
        m, l, acc, best, u = empty_partial_states(splits, G, M, E, queries.device)
        ext.reduce(
            *extension_arguments(inputs, (m, l, acc, best, u), dictionary),
            splits,
            per_chunk,
            inputs.key_scale,
            inputs.images.dtype == torch.uint8,
            provenance,
            threads,
            choose_isa(ext, self.isa),
            0,  # no per-image logit bias
        )
        state = fold_partial_states(dictionary, m, l, acc, best if provenance else None, u if provenance else None)
        chunks = G * math.ceil(math.ceil(dictionary.size / ext.TILE_N) / per_chunk)
        return BackendOutput(state, chunks)
