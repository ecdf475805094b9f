"""Triton backend: the fused kernel of `elsfast.kernels.softmax_reduce` (keys gathered from the training images
on the fly, streaming log-sum-exp, dictionary split across programs and merged exactly with `ReduceState.fold_`).

Runs on CUDA tensors, and on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is
imported), which is for testing: `auto` never picks it on a CPU. fp32 only.

Precision policy (SPEC section 5). The distance dot q'.k may run on tf32 tensor cores (operands rounded to 10
mantissa bits, relative error at most 2^-11 each) only where the resulting logit error is negligible:
|error| <= 2^-10 sum_f |q'_f k_f| <= 2^-10 |q'| |k| bits, with |q'| = 2a/T log2(e) |q| the largest scaled query
norm and |k| <= sqrt(D) max|pixel| the largest key norm. tf32 is used when that bound is at most
`TF32_MAX_LOGIT_ERROR` bits (a weight then moves by at most 0.07%), which happens only at very high noise; otherwise
"tf32x3" (three tf32 products, fp32-accurate, still on tensor cores). `precision="ieee"` forces plain fp32 FMAs.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass

import torch

from .dictionary import Dictionary
from .registry import Backend, BackendOutput, register_backend
from .state import ReduceState

__all__ = ["TF32_MAX_LOGIT_ERROR", "Triton", "dot_precision", "fold_partial_states"]

TF32_MAX_LOGIT_ERROR = 1e-3  # bits
LOG2E = 1.0 / math.log(2.0)
PRECISIONS = ("auto", "tf32", "tf32x3", "ieee")
PROGRAMS_PER_SM = 4


def dot_precision(abar: float, query_norm: float, key_norm: float, precision: str = "auto") -> str:
    """The `tl.dot` input precision for the distance dot: `precision` itself unless "auto", then "tf32" where the
    tf32 logit error bound `2^-10 (2a/T) log2(e) query_norm key_norm` (bits) is at most `TF32_MAX_LOGIT_ERROR`,
    "tf32x3" otherwise. `query_norm`, `key_norm`: the largest query and key norms (pixel units)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    a, T = math.sqrt(abar), 2.0 * (1.0 - abar)
    bound = 2.0**-10 * 2.0 * a / T * LOG2E * query_norm * key_norm
    return "tf32" if bound <= TF32_MAX_LOGIT_ERROR else "tf32x3"


def fold_partial_states(
    dictionary: Dictionary,
    m: torch.Tensor,
    l: torch.Tensor,
    acc: torch.Tensor,
    best: torch.Tensor | None,
    u: torch.Tensor | None,
) -> ReduceState:
    """Merge a kernel's per-split partial states (leading axis: splits) and turn the local ids of `best`
    (`n * S + s`, n the row in `dictionary.images`) into the dictionary's ids (`image_ids[n] * S + s`)."""
    state = ReduceState(m, l, acc, best, u).fold_()
    if state.best is not None and dictionary.image_ids is not None:
        S = dictionary.entries_per_image
        image_ids = dictionary.image_ids.to(state.best.device)
        local = state.best.clamp(min=0)
        state.best = torch.where(state.best >= 0, image_ids[local // S] * S + local % S, -1)
    return state


def key_norm_bound(dictionary: Dictionary) -> float:
    """An upper bound on the norm of every key: sqrt(D) times the largest pixel magnitude (1 for uint8)."""
    images = dictionary.images
    largest = 1.0 if images.dtype == torch.uint8 else float(images.abs().max()) if images.numel() else 0.0
    return math.sqrt(dictionary.key_dim) * largest


@register_backend
@dataclass(frozen=True)
class Triton(Backend):
    """Fused Triton kernel (CUDA; CPU only under the interpreter, for tests).

    Args:
        precision: distance-dot precision, "auto" (the policy of the module docstring), "tf32", "tf32x3", "ieee".
        block_m, block_n: query and entry tile sizes (powers of two, at least 16).
        splits: dictionary splits per (query block, group); None: enough programs to fill the GPU (one on a CPU).
    """

    precision: str = "auto"
    block_m: int = 64
    block_n: int = 64
    splits: int | None = None

    NAME = "triton"
    PRIORITY = 20

    def __post_init__(self) -> None:
        dot_precision(0.5, 0.0, 0.0, self.precision)
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"splits must be >= 1 or None, got {self.splits}")

    def options(self) -> dict:
        return {"precision": self.precision, "block_m": self.block_m, "block_n": self.block_n, "splits": self.splits}

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        reasons = []
        try:
            importlib.import_module("elsfast.kernels.softmax_reduce")
        except ImportError as error:
            reasons.append(f"triton is not importable ({error}); pip install triton")
        if queries.dtype != torch.float32:
            reasons.append(f"the kernels compute in float32, queries are {queries.dtype} (float64 runs on torch)")
        if dictionary.images.dtype not in (torch.uint8, torch.float32):
            reasons.append(f"training images must be uint8 or float32, got {dictionary.images.dtype}")
        if queries.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("no CUDA device: CPU tensors run only under Triton's interpreter (TRITON_INTERPRET=1)")
        elif queries.device.type not in ("cpu", "cuda"):
            reasons.append(f"device {queries.device.type} is not supported")
        return reasons

    def auto_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        interpreted = ["the Triton interpreter is for testing; torch is the CPU backend"]
        return self.unsupported_reasons(queries, dictionary) + (interpreted if queries.device.type == "cpu" else [])

    def reduce(
        self,
        queries: torch.Tensor,
        dictionary: Dictionary,
        *,
        abar: float,
        memory_budget: int,
        provenance: bool = False,
    ) -> BackendOutput:
        from elsfast.kernels.softmax_reduce import launch_softmax_reduce

        G, M, _ = queries.shape
        device = queries.device
        if G * M == 0 or dictionary.size == 0:
            E, dtype = dictionary.value_dim, torch.float32
            return BackendOutput(ReduceState.empty(G, M, E, dtype=dtype, device=device, provenance=provenance), 0)
        a, T = math.sqrt(abar), 2.0 * (1.0 - abar)
        q = (queries * (2.0 * a / T * LOG2E)).contiguous()
        images = dictionary.images.to(device).reshape(dictionary.num_images, -1).contiguous()
        key_offsets, value_offsets = (t.to(device, torch.int32).contiguous() for t in dictionary.pixel_offsets())
        precision = dot_precision(abar, float(queries.norm(dim=-1).max()), key_norm_bound(dictionary), self.precision)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        partial = launch_softmax_reduce(
            q,
            images,
            key_offsets,
            value_offsets,
            key_scale=a * a / T * LOG2E,
            splits=self.splits,
            min_programs=PROGRAMS_PER_SM * sms,
            provenance=provenance,
            dot_precision=precision,
            block_m=self.block_m,
            block_n=self.block_n,
        )
        return BackendOutput(fold_partial_states(dictionary, *partial), 1)
