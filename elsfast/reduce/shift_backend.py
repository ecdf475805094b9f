"""Displacement backend: the compiled kernel `elsfast._cpu.reduce_shifts` (csrc/cpu_shift_kernel.inc) for
zero-padded ELS, where a pair's distance is a box sum along its displacement (SPEC section 5): 2P operations a
pair instead of the P^2 of a dot product, so large patches cost about what small ones do.

It needs the structure the machines give their queries: query `s * B + b` of group g is the patch of image b at
the group's position s, and every group is a rectangle of positions (the border classes of zero-padded ELS). The
backend rebuilds the B query images from the patches inside `reduce` and checks that they give back every query
exactly; queries without that structure (e.g. a subset of a group's queries) are refused there, before any work
(`BackendUnavailable`: a named request fails, `auto` moves on to the `cpu` kernel). Float32, CPU tensors, at most
4 channels. With provenance it runs the `cpu` kernel, which tracks the dominant entry (the report names `cpu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..common.threads import kernel_threads
from . import cpu_ext
from .dictionary import Dictionary, PatchDictionary
from .registry import Backend, BackendOutput, BackendUnavailable, describe_inputs, register_backend

__all__ = ["Shifts", "group_rectangles", "query_images"]


def group_rectangles(dictionary: Dictionary) -> torch.Tensor | str:
    """`(G, 4)` int32 first row, rows, first column and columns of each group's positions when every group is a
    rectangle of positions listed row by row (as `patches.group_sets` makes them for ELS), else why not."""
    if not isinstance(dictionary, PatchDictionary):
        return "not a patch dictionary"
    if dictionary.padding != "zeros":
        return f"{dictionary.padding} padding (the kernel follows displacements without wrapping)"
    W = dictionary.images.shape[3]
    pos = dictionary.positions.cpu()
    ys, xs = pos // W, pos % W
    y0, x0 = ys.min(1).values, xs.min(1).values
    rows, cols = ys.max(1).values - y0 + 1, xs.max(1).values - x0 + 1
    if not bool((rows * cols == pos.shape[1]).all()):
        return "the positions of a group do not form a rectangle"
    s = torch.arange(pos.shape[1])
    expected = (y0[:, None] + s // cols[:, None]) * W + x0[:, None] + s % cols[:, None]
    if not torch.equal(expected, pos):
        return "the positions of a group are not listed row by row"
    return torch.stack([y0, rows, x0, cols], 1).to(torch.int32)


def query_images(queries: torch.Tensor, dictionary: PatchDictionary) -> torch.Tensor | str:
    """The B images `(B, C, H + 2r, W + 2r)` (zero-padded by r = P // 2) whose patches at the dictionary's
    positions are the queries `(G, S * B, D)` (query `s * B + b` of group g: image b at position s), or why the
    queries are not such patches."""
    G, M, _ = queries.shape
    S = dictionary.entries_per_image
    if M % S:
        return f"{M} queries a group are not whole images ({S} positions a group)"
    B = M // S
    C, H, W = dictionary.images.shape[1:]
    P = dictionary.patch_size
    pos = dictionary.positions.to(queries.device)
    window = torch.arange(P, device=queries.device)
    rows = (pos // W)[..., None, None] + window.view(P, 1)  # (G, S, P, 1) padded rows of the patch
    cols = (pos % W)[..., None, None] + window.view(1, P)  # (G, S, 1, P)
    patches = queries.reshape(G, S, B, C, P, P).permute(2, 3, 0, 1, 4, 5)  # (B, C, G, S, P, P)
    images = queries.new_zeros(B, C, H + P - 1, W + P - 1)
    images[:, :, rows, cols] = patches
    if not torch.equal(images[:, :, rows, cols], patches):
        return "the queries are not the patches of whole images at the dictionary's positions"
    return images


@register_backend
@dataclass(frozen=True)
class Shifts(Backend):
    """The displacement kernel (csrc/cpu_shift_kernel.inc) for zero-padded ELS on CPU tensors.

    Args:
        splits: partial states per query (block k of 8 or 16 training images folds into split k % splits); None:
            enough work units (query images x splits) for two per thread.
        isa: "auto" (AVX-512 over AVX2), "avx2" or "avx512".
    """

    splits: int | None = None
    isa: str = "auto"

    NAME = "shifts"
    LIMITS: ClassVar[dict[str, str]] = {
        **cpu_ext.CPU_KERNEL_LIMITS,
        "zeros": "needs a zero-padded patch dictionary",
        "rectangles": "needs groups whose positions form rectangles listed row by row (ELS border classes)",
        "whole_images": "needs queries that are the patches of whole images at the dictionary's positions",
    }

    def __post_init__(self) -> None:
        cpu_ext.check_options(self, ("splits",))

    def options(self) -> dict:
        return {"splits": self.splits, "isa": self.isa}

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        reasons = cpu_ext.unsupported_reasons(self, queries, dictionary)
        if not isinstance(dictionary, PatchDictionary) or dictionary.padding != "zeros":
            return [*reasons, self.refuse("zeros", getattr(dictionary, "padding", type(dictionary).__name__))]
        rectangles = group_rectangles(dictionary)
        if isinstance(rectangles, str):
            reasons.append(self.refuse("rectangles", rectangles))
        if queries.shape[1] % dictionary.entries_per_image:
            S = dictionary.entries_per_image
            reasons.append(self.refuse("whole_images", f"{queries.shape[1]} queries a group, {S} positions a group"))
        return reasons

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
        threads = kernel_threads()
        if provenance:  # the displacement kernel does not track the dominant entry
            state, chunks = cpu_ext.reduce_dictionary(
                queries, dictionary, abar=abar, memory_budget=memory_budget, provenance=True, threads=threads,
                isa=self.isa,
            )  # fmt: skip
            return BackendOutput(state, chunks, backends=("cpu",) * queries.shape[0])
        images = query_images(queries, dictionary)
        if isinstance(images, str):
            reason = self.refuse("whole_images", images)
            problem = describe_inputs(queries, dictionary)
            raise BackendUnavailable(f"backend 'shifts' cannot run {problem}: {reason}", [reason])
        M = queries.shape[1]
        blocks = math.ceil(dictionary.num_images / cpu_ext.lanes(cpu_ext.choose_isa(self.isa)))
        splits = self.splits or max(1, min(cpu_ext.MAX_SPLITS, blocks, math.ceil(2 * threads / images.shape[0])))
        state = cpu_ext.reduce_shifts(
            images, dictionary, group_rectangles(dictionary), queries_per_group=M, abar=abar, splits=splits,
            threads=threads, isa=self.isa,
        )  # fmt: skip
        return BackendOutput(state, blocks)
