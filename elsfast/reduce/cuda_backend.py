"""CUDA backend: the compiled extension `elsfast._cuda` (csrc/, called through `cuda_ext`): keys gathered from the
training images on the fly, fp32 distances and exp2 online softmax (fp32 tile sums folded into fp64 running sums),
one query per thread, dictionary split across blocks and merged exactly with `ReduceState.fold_`.

Patch dictionaries (LS, ELS; values of at most 4 channels) on CUDA tensors, fp32. The extension is built by
setup.py when nvcc is present; `cuda_ext.reduce_on_host` runs the kernel's algorithm from the same source serially
on the CPU, which is how the tests check the CUDA source without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cuda_ext
from .dictionary import Dictionary
from .registry import Backend, BackendOutput, Tolerance, register_backend

__all__ = ["Cuda"]


@register_backend
@dataclass(frozen=True)
class Cuda(Backend):
    """The compiled CUDA extension (csrc/), for patch dictionaries on CUDA tensors.

    Args:
        splits: dictionary splits per (query block, group); None: enough blocks to fill the GPU.

    `memory_budget` is not used: the kernel streams the keys from the training images through shared memory and
    allocates only its partial states (splits x G x M x (E + 4) values).
    """

    splits: int | None = None

    NAME = "cuda"
    LIMITS = cuda_ext.CUDA_KERNEL_LIMITS

    def __post_init__(self) -> None:
        if self.splits is not None and (isinstance(self.splits, bool) or not isinstance(self.splits, int)
                                        or self.splits < 1):  # fmt: skip
            raise ValueError(f"splits must be a positive integer or None, got {self.splits!r}")

    def options(self) -> dict:
        return {"splits": self.splits}

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """float32: `cuda_ext.accuracy()`, the bound of `elsfast.reduce.bounds` for fp32 FMA logits, tiles of 32
        terms summed in sequence and `exp2f` (2 ulp): (D/2 + 3) eps32 L + 2.3e-6 (docs/design.md)."""
        if dtype == torch.float32:
            return cuda_ext.accuracy()
        return super().accuracy(dtype)

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        return cuda_ext.unsupported_reasons(self, queries, dictionary)

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
        """`memory_budget` is ignored (class docstring)."""
        state = cuda_ext.reduce_dictionary(queries, dictionary, abar=abar, provenance=provenance, splits=self.splits)
        return BackendOutput(state, 1)
