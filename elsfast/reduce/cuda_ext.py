"""The binding of the compiled CUDA extension `elsfast._cuda` (csrc/bindings.cpp): its limits, its planning, its
typed call and the `torch.library` custom op it goes through (`elsfast::cuda_reduce`, with a fake implementation
so that `torch.compile` traces through it). The extension takes tensors and reads every size off their shapes
(csrc/reduce_binding.h, shared with `elsfast._cpu`); `reduce_on_host` runs the kernel's algorithm from the same
source serially on CPU tensors, which is how the tests check the CUDA source without a GPU.
"""

from __future__ import annotations

import math

import torch

from .bounds import U32, fma_logit_error, kernel_tolerance
from .dictionary import Dictionary
from .partials import (
    COMPILED_KERNEL_LIMITS,
    MAX_GRID_AXIS,
    compiled_kernel_reasons,
    empty_partial_states,
    fold_partial_states,
    import_extension,
    kernel_inputs,
    plan_splits,
    with_increasing_ids,
)
from .registry import Backend, Tolerance
from .state import ReduceState

__all__ = ["CUDA_KERNEL_LIMITS", "EXTENSION", "accuracy", "reduce_dictionary", "reduce_on_host", "unsupported_reasons"]

EXTENSION = import_extension("elsfast._cuda")  # the module, or the ImportError saying why it is missing

CUDA_KERNEL_LIMITS = {
    **COMPILED_KERNEL_LIMITS,
    "extension": "needs the compiled CUDA extension elsfast._cuda",
    "device": "needs CUDA tensors",
    "grid": f"needs at most {MAX_GRID_AXIS} groups (the CUDA grid limit)",
}


def unsupported_reasons(backend: Backend, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
    """Why the CUDA kernel cannot run this problem (for a backend whose `LIMITS` include `CUDA_KERNEL_LIMITS`)."""
    reasons = []
    if isinstance(EXTENSION, ImportError):
        detail = f"{EXTENSION}; reinstall with nvcc on PATH (ELSFAST_CUDA=1 makes a failed build an error)"
        reasons.append(backend.refuse("extension", detail))
    if queries.device.type != "cuda":
        reasons.append(backend.refuse("device", f"queries are on {queries.device.type}"))
    reasons += compiled_kernel_reasons(backend, queries, dictionary)
    if dictionary.num_groups > MAX_GRID_AXIS:
        reasons.append(backend.refuse("grid", f"{dictionary.num_groups} groups"))
    return reasons


def accuracy() -> Tolerance:
    """The kernel's float32 bound (`elsfast.reduce.bounds`): fp32 FMA logits, tiles of `TILE_N` = 32 terms summed
    in sequence and `exp2f` (2 ulp): (D/2 + 3) eps32 L + 2.3e-6 (docs/design.md)."""
    return kernel_tolerance(fma_logit_error(), tile_terms=32, exp2_relative=4 * U32)


@torch.library.custom_op("elsfast::cuda_reduce", mutates_args=())
def _cuda_reduce(
    q: torch.Tensor,
    images: torch.Tensor,
    key_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    key_scale: float,
    splits: int,
    entries_per_split: int,
    provenance: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA tensors: the kernel on the current stream of their device; CPU tensors: `reduce_host`."""
    G, M, _ = q.shape
    device = q.device
    outputs = empty_partial_states(splits, G, M, value_offsets.shape[2], device, sums=torch.float64)
    host = device.type == "cpu"
    stream = 0 if host else torch.cuda.current_stream(device).cuda_stream
    names = ("m", "l", "acc", "best", "u")
    EXTENSION.reduce(
        q=q,
        images=images,
        key_offsets=key_offsets,
        value_offsets=value_offsets,
        **dict(zip(names, outputs, strict=True)),
        key_scale=key_scale,
        provenance=provenance,
        entries_per_split=entries_per_split,
        stream=stream,
        host=host,
    )
    return outputs


@_cuda_reduce.register_fake
def _(q, images, key_offsets, value_offsets, key_scale, splits, entries_per_split, provenance):
    G, M, _ = q.shape
    return empty_partial_states(splits, G, M, value_offsets.shape[2], q.device, sums=torch.float64)


def reduce_dictionary(
    queries: torch.Tensor, dictionary: Dictionary, *, abar: float, provenance: bool, splits: int | None
) -> ReduceState:
    """The folded state of queries `(G, M, D)` fp32 against a patch `dictionary`: on CUDA tensors the kernel, on
    CPU tensors its host algorithm. `splits` None: enough blocks to fill the GPU (`partials.plan_splits`)."""
    G, M, _ = queries.shape
    if provenance:  # ties go to the lowest local id: make it the lowest global id
        dictionary = with_increasing_ids(dictionary)
    inputs = kernel_inputs(queries, dictionary, abar)
    programs = math.ceil(M / EXTENSION.BLOCK_Q) * G
    splits, per_split = plan_splits(dictionary.size, EXTENSION.TILE_N, programs, queries.device, splits)
    m, l, acc, best, u = torch.ops.elsfast.cuda_reduce(
        inputs.q, inputs.images, inputs.key_offsets, inputs.value_offsets, inputs.key_scale, splits, per_split,
        provenance,
    )  # fmt: skip
    return fold_partial_states(dictionary, m, l, acc, best if provenance else None, u if provenance else None)


def reduce_on_host(
    queries: torch.Tensor, dictionary: Dictionary, *, abar: float, provenance: bool = False, splits: int = 1
) -> ReduceState:
    """The CUDA kernel's algorithm (csrc/reduce.cu, `reduce_host`) run serially on CPU tensors: queries `(G, M, D)`
    float32, a patch dictionary with uint8 or float32 images. For testing the CUDA source without a GPU."""
    if isinstance(EXTENSION, ImportError):
        raise EXTENSION
    if queries.device.type != "cpu":
        raise ValueError(f"reduce_on_host runs on CPU tensors; queries are on {queries.device}")
    return reduce_dictionary(queries, dictionary, abar=abar, provenance=provenance, splits=splits)
