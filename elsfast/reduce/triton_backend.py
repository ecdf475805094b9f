"""Triton backend: the fused kernel of `elsfast.kernels.softmax_reduce` (keys gathered from the training images
on the fly, streaming log-sum-exp, dictionary split across programs and merged exactly with `ReduceState.fold_`).

Runs on CUDA tensors, and on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is
imported), which is for testing: `auto` never picks it on a CPU. fp32 only.

Precision policy (SPEC section 5). uint8 images: "fp16x2", the exact integer keys 2u - 255 against the queries'
two fp16 halves; float32 images: "tf32x3" (three tf32 products on tensor cores). Each has a worst-case bound
(`elsfast.reduce.bounds`, derived in docs/design.md) within `AUTO_BOUND_RATIO` (10x) of the float32 cpu kernel's
on every problem; "auto" never takes one that is not. "tf32" (operands truncated to 10 mantissa bits: a logit off
by up to 2^-9 sum_f |q'_f k_f|) and "ieee" (plain fp32 FMAs, 4-5x tighter than fp16x2, no tensor cores) run only
when asked for.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .bounds import TRITON_LOGIT_ERROR, kernel_tolerance
from .dictionary import Dictionary
from .partials import (
    MAX_GRID_AXIS,
    KernelInputs,
    fold_partial_states,
    kernel_inputs,
    plan_splits,
    with_increasing_ids,
)
from .registry import Backend, BackendOutput, Tolerance, register_backend
from .tuning import TUNING_PAIRS, choose_config, time_call, tuning_key

__all__ = ["AUTO_BOUND_RATIO", "Triton", "bound_ratio", "dot_precision", "precision_tolerance", "value_block"]

PRECISIONS = ("auto", "fp16x2", "tf32", "tf32x3", "ieee")
AUTO_BOUND_RATIO = 10.0  # "auto" never takes a precision whose bound is looser than the cpu kernel's by more
# the longest run of fp32 additions in a tile's sums: BLOCK_N terms (default and tuned tiles have at most 128)
DEFAULT_TILE_TERMS = 128
EX2_RELATIVE = 2.0**-22  # ex2.approx.ftz.f32 (PTX ISA: relative error below 2^-22 on [-126, 0])


def precision_tolerance(precision: str, block_n: int | None = None) -> Tolerance:
    """The float32 `Tolerance` of the kernel with distance dot `precision` (not "auto") and tiles of `block_n`
    entries (None: the default and tuned tiles, at most 128)."""
    terms = max(DEFAULT_TILE_TERMS, block_n or 0)
    return kernel_tolerance(TRITON_LOGIT_ERROR[precision], tile_terms=terms, exp2_relative=EX2_RELATIVE)


def bound_ratio(tolerance: Tolerance, reference: Tolerance, key_dim: int) -> float:
    """The largest ratio of `tolerance`'s bound to `reference`'s over every logit range, for keys of `key_dim`
    features: max of the ratios of their logit terms and of their absolute terms (both bounds are increasing in
    the logit error, so the ratio of the sums is at most the larger ratio of the parts)."""
    logit = tolerance.per_logit + tolerance.per_feature * key_dim
    reference_logit = reference.per_logit + reference.per_feature * key_dim
    return max(logit / reference_logit, tolerance.absolute / reference.absolute)


def dot_precision(precision: str = "auto", uint8: bool = False) -> str:
    """The distance dot's precision: `precision` itself unless "auto", then "fp16x2" for uint8 images (`uint8`),
    else "tf32x3". "fp16x2" needs integer keys, i.e. uint8 images."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16x2" and not uint8:
        raise ValueError('precision "fp16x2" needs uint8 images (exact integer keys)')
    if precision != "auto":
        return precision
    return "fp16x2" if uint8 else "tf32x3"


def value_block(E: int) -> int:
    """Value channels one program accumulates (`BLOCK_E`): E rounded up to a power of two, at least 16 (a GPU
    `tl.dot` dimension), at most 64 (whole-image dictionaries run in several value blocks)."""
    return min(64, max(16, 1 << (E - 1).bit_length()))


def shared_memory_limit(device: torch.device) -> int:
    """Shared memory one block may use on `device` (227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/89), for
    `launch_config`'s re-planning; the sm_90 figure off CUDA (the interpreter)."""
    from elsfast.kernels.softmax_reduce import SHARED_MEMORY_LIMIT

    if device.type != "cuda":
        return SHARED_MEMORY_LIMIT
    properties = torch.cuda.get_device_properties(device)
    return int(getattr(properties, "shared_memory_per_block_optin", SHARED_MEMORY_LIMIT))


@register_backend
@dataclass(frozen=True)
class Triton(Backend):
    """Fused Triton kernel (CUDA; CPU only under the interpreter, for tests).

    Args:
        precision: distance-dot precision, "auto" (the policy of the module docstring), "fp16x2" (uint8 images),
            "tf32", "tf32x3", "ieee".
        block_m, block_n: query and entry tile sizes (powers of two, at least 16); None: the kernel's default for
            the key dimension (`elsfast.kernels.softmax_reduce.launch_config`). Tiles over the shared-memory
            limit are re-planned before launch.
        splits: dictionary splits per (query block, group); None: enough programs to fill the GPU (one on a CPU).
        tune: time every configuration of `elsfast.kernels.softmax_reduce.tuning_space` (tiles and warps) the
            first time a kind of problem comes, and keep the fastest (`elsfast.reduce.tuning`: kept per device,
            key shape, precision and size class, in memory and in the disk cache). Excludes block_m and block_n.
            The first call of each kind then costs a compile and three timed runs per candidate.

    `memory_budget` is not used: the kernel gathers the keys from the training images tile by tile in on-chip
    memory and allocates only its partial states (splits x G x M x (E + 4) values).
    """

    precision: str = "auto"
    block_m: int | None = None
    block_n: int | None = None
    splits: int | None = None
    tune: bool = False

    NAME = "triton"
    LIMITS: ClassVar[dict[str, str]] = {
        "triton": "needs triton",
        "float32": "computes in float32 (float64 runs on torch)",
        "image_dtype": "needs uint8 or float32 training images",
        "device": "needs CUDA tensors (CPU tensors only under Triton's interpreter, for tests)",
        "grid": f"needs at most {MAX_GRID_AXIS} groups x value blocks (the CUDA grid limit)",
    }

    def __post_init__(self) -> None:
        dot_precision(self.precision, uint8=True)
        for name in ("block_m", "block_n"):
            size = getattr(self, name)
            if size is not None and (size < 16 or size & (size - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {size}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"splits must be >= 1 or None, got {self.splits}")
        if self.tune and (self.block_m is not None or self.block_n is not None):
            raise ValueError("tune=True chooses block_m and block_n by timing: give either tune or the tiles")

    def options(self) -> dict:
        return {
            "precision": self.precision,
            "block_m": self.block_m,
            "block_n": self.block_n,
            "splits": self.splits,
            "tune": self.tune,
        }

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        reasons = []
        try:
            importlib.import_module("elsfast.kernels.softmax_reduce")
        except ImportError as error:
            reasons.append(self.refuse("triton", f"{error}; pip install triton"))
        if queries.dtype != torch.float32:
            reasons.append(self.refuse("float32", f"queries are {queries.dtype}"))
        if dictionary.images.dtype not in (torch.uint8, torch.float32):
            reasons.append(self.refuse("image_dtype", f"got {dictionary.images.dtype}"))
        if queries.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append(self.refuse("device", "queries are on cpu and TRITON_INTERPRET is not 1"))
        elif queries.device.type not in ("cpu", "cuda"):
            reasons.append(self.refuse("device", f"queries are on {queries.device.type}"))
        if (
            queries.device.type == "cuda"
            and dictionary.num_groups * math.ceil(dictionary.value_dim / 64) > MAX_GRID_AXIS
        ):
            reasons.append(self.refuse("grid", f"{dictionary.num_groups} groups"))
        return reasons

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """float32: the bound of `elsfast.reduce.bounds` for the distance dot's precision and the tiles' sums (at
        most `block_n`, else 128 terms) with ex2.approx; under "auto" the looser of "fp16x2" (uint8 images) and
        "tf32x3" (float32 images). fp16x2: (2.5 D + 4) eps32 L + 7.9e-6 (docs/design.md)."""
        if dtype != torch.float32:
            return super().accuracy(dtype)
        if self.precision != "auto":
            return precision_tolerance(self.precision, self.block_n)
        a, b = (precision_tolerance(p, self.block_n) for p in ("fp16x2", "tf32x3"))
        return Tolerance(*(max(x, y) for x, y in zip(a, b, strict=True)))

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
        from elsfast.kernels.softmax_reduce import launch_config, launch_softmax_reduce, tuning_space

        G, M, _ = queries.shape
        if provenance:  # ties go to the lowest local id: make it the lowest global id
            dictionary = with_increasing_ids(dictionary)
        inputs = kernel_inputs(queries, dictionary, abar)
        uint8 = dictionary.images.dtype == torch.uint8
        precision = dot_precision(self.precision, uint8)
        E = dictionary.value_dim
        device = queries.device
        options = dict(
            is_uint8=uint8,
            provenance=provenance,
            dot_precision=precision,
            block_e=value_block(E),
            fast_exp2=device.type == "cuda",
            shared_memory_limit=shared_memory_limit(device),
        )

        def run(config: dict, dictionary: Dictionary, inputs) -> tuple[torch.Tensor | None, ...]:
            programs = math.ceil(M / config["BLOCK_M"]) * G * math.ceil(E / config["BLOCK_E"])
            # a tile is BLOCK_N images at one position: S rows of ceil(N / BLOCK_N) tiles
            tiles = dictionary.entries_per_image * math.ceil(dictionary.num_images / config["BLOCK_N"])
            splits, per_split = plan_splits(tiles, 1, programs, device, self.splits)
            return launch_softmax_reduce(*inputs, splits=splits, tiles_per_split=per_split, config=config)

        if self.tune:
            candidates = tuning_space(dictionary.key_dim, E, **options)
            key = tuning_key(device, candidates[0], G * M, dictionary.size)

            @functools.cache
            def sample() -> tuple[Dictionary, KernelInputs]:
                """The queries against the leading images only, about TUNING_PAIRS pairs, for timing: the work per
                tile is the full problem's."""
                per_image = max(1, G * M * dictionary.entries_per_image)  # the pairs one training image adds
                n = min(dictionary.num_images, max(1, math.ceil(TUNING_PAIRS / per_image)))
                if n == dictionary.num_images:  # a small problem is timed whole, on the inputs already built
                    return dictionary, inputs
                ids = dictionary.image_ids
                leading = replace(dictionary, images=dictionary.images[:n], image_ids=None if ids is None else ids[:n])
                return leading, kernel_inputs(queries, leading, abar)

            config = choose_config(
                key, candidates, lambda config: run(config, *sample()), timer=lambda call: time_call(call, device)
            )
        else:
            config = launch_config(dictionary.key_dim, E, block_m=self.block_m, block_n=self.block_n, **options)
        return BackendOutput(fold_partial_states(dictionary, *run(config, dictionary, inputs)), 1)
