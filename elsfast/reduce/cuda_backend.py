"""CUDA backend: the compiled extension `elsfast._cuda` (csrc/): keys gathered from the training images on the
fly, fp32 distances and exp2 online softmax (fp32 tile sums folded into fp64 running sums), one query per
thread, dictionary split across blocks and merged exactly with `ReduceState.fold_`.

Patch dictionaries (LS, ELS; values of at most 4 channels) on CUDA tensors, fp32. The extension is built by
setup.py when nvcc is present; `reduce_on_host` runs the kernel's algorithm from the same source serially on the
CPU, which is how the tests check the CUDA source without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .bounds import U32, fma_logit_error, kernel_tolerance
from .dictionary import Dictionary
from .partials import (
    COMPILED_KERNEL_LIMITS,
    MAX_GRID_AXIS,
    compiled_kernel_reasons,
    empty_partial_states,
    extension_arguments,
    fold_partial_states,
    import_extension,
    kernel_inputs,
    plan_splits,
    with_increasing_ids,
)
from .registry import Backend, BackendOutput, Tolerance, register_backend
from .state import ReduceState

__all__ = ["Cuda", "reduce_on_host"]


def _run(queries: torch.Tensor, dictionary: Dictionary, abar: float, provenance: bool, splits: int | None, host: bool):
    ext = import_extension("elsfast._cuda")
    if isinstance(ext, ImportError):
        raise ext
    G, M, _ = queries.shape
    device = queries.device
    if provenance:  # ties go to the lowest local id: make it the lowest global id
        dictionary = with_increasing_ids(dictionary)
    inputs = kernel_inputs(queries, dictionary, abar)
    programs = math.ceil(M / ext.BLOCK_Q) * G
    splits, per_split = plan_splits(dictionary.size, ext.TILE_N, programs, device, splits)
    E = dictionary.value_dim
    m, l, acc, best, u = empty_partial_states(splits, G, M, E, device, sums=torch.float64)
    stream = 0 if host else torch.cuda.current_stream(device).cuda_stream
    # the extension launches on the tensors' device, whatever the current device is
    index = -1 if host else (device.index if device.index is not None else torch.cuda.current_device())
    ext.reduce(
        *extension_arguments(inputs, (m, l, acc, best, u), dictionary),
        per_split,
        splits,
        inputs.key_scale,
        inputs.images.dtype == torch.uint8,
        provenance,
        stream,
        host,
        index,
    )
    return fold_partial_states(dictionary, m, l, acc, best if provenance else None, u if provenance else None)


def reduce_on_host(
    queries: torch.Tensor, dictionary: Dictionary, *, abar: float, provenance: bool = False, splits: int = 1
) -> ReduceState:
    """The CUDA kernel's algorithm (csrc/reduce.cu, `reduce_host`) run serially on CPU tensors: queries `(G, M, D)`
    float32, a patch dictionary with uint8 or float32 images. For testing the CUDA source without a GPU."""
    return _run(queries, dictionary, abar, provenance, splits, host=True)


@register_backend
@dataclass(frozen=True)
class Cuda(Backend):
    """The compiled CUDA extension (csrc/), for patch dictionaries on CUDA tensors.

    Args:
        splits: dictionary splits per (query block, group); None: enough blocks to fill the GPU.
    """

    splits: int | None = None

    NAME = "cuda"
    LIMITS: ClassVar[dict[str, str]] = {
        **COMPILED_KERNEL_LIMITS,
        "extension": "needs the compiled CUDA extension elsfast._cuda",
        "device": "needs CUDA tensors",
        "grid": f"needs at most {MAX_GRID_AXIS} groups (the CUDA grid limit)",
    }

    def __post_init__(self) -> None:
        if self.splits is not None and (isinstance(self.splits, bool) or not isinstance(self.splits, int)
                                        or self.splits < 1):  # fmt: skip
            raise ValueError(f"splits must be a positive integer or None, got {self.splits!r}")

    def options(self) -> dict:
        return {"splits": self.splits}

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """float32: the bound of `elsfast.reduce.bounds` for fp32 FMA logits, tiles of `TILE_N` = 32 terms summed in
        sequence and `exp2f` (2 ulp): (D/2 + 3) eps32 L + 2.3e-6 (docs/design.md)."""
        if dtype == torch.float32:
            return kernel_tolerance(fma_logit_error(), tile_terms=32, exp2_relative=4 * U32)
        return super().accuracy(dtype)

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        reasons = []
        ext = import_extension("elsfast._cuda")
        if isinstance(ext, ImportError):
            detail = f"{ext}; reinstall with nvcc on PATH (ELSFAST_CUDA=1 makes a failed build an error)"
            reasons.append(self.refuse("extension", detail))
        if queries.device.type != "cuda":
            reasons.append(self.refuse("device", f"queries are on {queries.device.type}"))
        reasons += compiled_kernel_reasons(self, queries, dictionary)
        if dictionary.num_groups > MAX_GRID_AXIS:
            reasons.append(self.refuse("grid", f"{dictionary.num_groups} groups"))
        return reasons

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
        return BackendOutput(_run(queries, dictionary, abar, provenance, self.splits, host=False), 1)
