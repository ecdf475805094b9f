"""CPU backend: the compiled kernel `elsfast._cpu` (csrc/cpu_reduce.cpp, called through `cpu_ext`): keys packed
from the training images chunk by chunk, a register-tiled AVX2 + FMA or AVX-512 distance micro-kernel fused with a
vectorised exp2 online softmax (fp32 logits, fp64 running sums), OpenMP threads over query blocks and dictionary
splits, the per-split states merged exactly with `ReduceState.fold_`.

Patch dictionaries (LS, ELS; values of at most 4 channels) on CPU tensors, float32, on x86-64 CPUs with AVX2 and
FMA (AVX-512F where the CPU has it). Built by setup.py wherever a C++ compiler with OpenMP is found
(`ELSFAST_CPU=1` makes a failed build an error, `0` skips it). IS, ES and float64 run on the torch backend.
Running sums are fp64, so the result is as accurate as its fp32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common.threads import kernel_threads
from . import cpu_ext
from .dictionary import Dictionary
from .registry import Backend, BackendOutput, Tolerance, register_backend

__all__ = ["Cpu"]


@register_backend
@dataclass(frozen=True)
class Cpu(Backend):
    """The compiled CPU kernel (csrc/cpu_reduce.cpp), for patch dictionaries on CPU tensors.

    Args:
        splits: partial states per query (key tile t of a chunk folds into split t % splits); None: enough work
            units for two per thread (`torch.get_num_threads()`).
        tiles_per_chunk: key tiles of 256 entries packed at once and shared by the threads; None: about 2 MB,
            at most a quarter of `memory_budget`.
        isa: "auto" (the widest this CPU runs: AVX-512 over AVX2), "avx2" or "avx512".
    """

    splits: int | None = None
    tiles_per_chunk: int | None = None
    isa: str = "auto"

    NAME = "cpu"
    LIMITS = cpu_ext.CPU_KERNEL_LIMITS

    def __post_init__(self) -> None:
        cpu_ext.check_options(self, ("splits", "tiles_per_chunk"))

    def options(self) -> dict:
        return {"splits": self.splits, "tiles_per_chunk": self.tiles_per_chunk, "isa": self.isa}

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """float32: `cpu_ext.accuracy()`, the bound of `elsfast.reduce.bounds` for fp32 FMA logits, tile sums of at
        most 20 terms and the Cephes exp2: (D/2 + 3) eps32 L + 3.0e-6 (docs/design.md). The yardstick `auto` holds
        the GPU kernels to."""
        if dtype == torch.float32:
            return cpu_ext.accuracy()
        return super().accuracy(dtype)

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        return cpu_ext.unsupported_reasons(self, queries, dictionary)

    # eager, not traced: inductor's fusion of the input preparation would change the last bits of the result
    # (the kernel itself is a custom op, `elsfast.reduce.cpu_ext` / `cuda_ext`, traceable when called directly)
    @torch._dynamo.disable
    def reduce(
        self,
        queries: torch.Tensor,
        dictionary: Dictionary,
        *,
        abar: float,
        memory_budget: int,
        provenance: bool = False,
    ) -> BackendOutput:
        state, chunks = cpu_ext.reduce_dictionary(
            queries,
            dictionary,
            abar=abar,
            memory_budget=memory_budget,
            provenance=provenance,
            threads=kernel_threads(),
            isa=self.isa,
            splits=self.splits,
            tiles_per_chunk=self.tiles_per_chunk,
        )
        return BackendOutput(state, chunks)
