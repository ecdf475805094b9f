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
from .partials import MAX_GRID_AXIS, fold_partial_states, kernel_inputs, plan_splits
from .registry import Backend, BackendOutput, register_backend
from .state import logit_scales

__all__ = ["TF32_MAX_LOGIT_ERROR", "Triton", "dot_precision", "key_norm_bound", "value_block"]

TF32_MAX_LOGIT_ERROR = 1e-3  # bits
PRECISIONS = ("auto", "tf32", "tf32x3", "ieee")


def dot_precision(abar: float, query_norm: float, key_norm: float, precision: str = "auto") -> str:
    """The `tl.dot` input precision for the distance dot: `precision` itself unless "auto", then "tf32" where the
    tf32 logit error bound `2^-10 (2a/T) log2(e) query_norm key_norm` (bits) is at most `TF32_MAX_LOGIT_ERROR`,
    "tf32x3" otherwise. `query_norm`, `key_norm`: the largest query and key norms (pixel units)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    bound = 2.0**-10 * logit_scales(abar)[0] * query_norm * key_norm
    return "tf32" if bound <= TF32_MAX_LOGIT_ERROR else "tf32x3"


def value_block(E: int) -> int:
    """Value channels one program accumulates (`BLOCK_E`): E rounded up to a power of two, at least 16 (a GPU
    `tl.dot` dimension), at most 64 (whole-image dictionaries run in several value blocks)."""
    return min(64, max(16, 1 << (E - 1).bit_length()))


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
        if (
            queries.device.type == "cuda"
            and dictionary.num_groups * math.ceil(dictionary.value_dim / 64) > MAX_GRID_AXIS
        ):
            reasons.append(f"more than {MAX_GRID_AXIS} groups x value blocks (the CUDA grid limit)")
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
        inputs = kernel_inputs(queries, dictionary, abar)
        precision = dot_precision(abar, float(queries.norm(dim=-1).max()), key_norm_bound(dictionary), self.precision)
        E = dictionary.value_dim
        block_e = value_block(E)
        programs = math.ceil(M / self.block_m) * G * math.ceil(E / block_e)
        splits, per_split = plan_splits(dictionary.size, self.block_n, programs, queries.device, self.splits)
        partial = launch_softmax_reduce(
            *inputs,
            splits=splits,
            entries_per_split=per_split,
            block_e=block_e,
            provenance=provenance,
            dot_precision=precision,
            block_m=self.block_m,
            block_n=self.block_n,
        )
        return BackendOutput(fold_partial_states(dictionary, *partial), 1)
