"""Fused Triton kernel of the patch-softmax core (SPEC section 5), installed as `elsfast.kernels.softmax_reduce`.

What it computes. For queries q `(G, M, D)` (already scaled to bits, q' = q 2a/T log2 e) and a dictionary given
by training images and offset tables (`Dictionary.pixel_offsets`), each program folds a range of the
dictionary's N*S entries into a streaming log-sum-exp state for BLOCK_M queries of one group:

    s_j  = q'.k_j - c |k_j|^2                 (bits; c = a^2/T log2 e; the |q|^2 term cancels in the softmax)
    m    = max_j s_j,  l = sum_j 2^(s_j - m),  acc = sum_j 2^(s_j - m) v_j
    best = the entry of largest s_j (first on ties),  u = sum_j 2^(s_j - m) (s_j - m)   (provenance)

Keys are gathered from the images inside the kernel (entry j = s * N + n, image n, position s: key feature f is
`image[n][key_offsets[g, s, f]]`, 0 where the offset is -1), so the patch dictionary is never materialised;
uint8 images are mapped to [-1, 1] on load. Tiling: BLOCK_M queries x BLOCK_N entries, the key dimension in
chunks of BLOCK_D (one chunk for patches up to D = 128), values in blocks of BLOCK_E (one block for patch
dictionaries, E = C; whole-image dictionaries (IS/ES) recompute the logits once per value block). The grid is
(query blocks, G x value blocks, SPLITS): SPLITS > 1 splits the dictionary across programs when there are few
queries; the partial states are merged exactly on the host (`ReduceState.merge_`).

Precision. Accumulation is fp32. The distance dot runs at `DOT_PRECISION`: "tf32" (tensor cores, 10-bit
mantissa) only where the logit scale allows it (see `elsfast.reduce.triton_backend.dot_precision`), otherwise
"tf32x3" (three tf32 products, fp32-accurate) or "ieee". The weighted value sum always runs fp32-accurate
("tf32x3", or "ieee" when the distances do). The interpreter (TRITON_INTERPRET=1) computes every dot
in exact fp32 whatever the setting. Offsets into the images and the outputs are 64-bit.

Differences from the torch backend: the same state and the same entry order within a split, one pass instead of
chunks and tiles of a memory budget; fp32 only (float64 queries run on torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["KERNEL_SIGNATURE", "launch_config", "launch_softmax_reduce", "softmax_reduce_kernel"]

# The runtime arguments of `softmax_reduce_kernel` and their Triton types (uint8 images: img_ptr "*u8"), for ahead-of-
# time compiles (benchmarks/static_cost.py, tests) that must match what the launcher passes.
KERNEL_SIGNATURE = dict(
    q_ptr="*fp32", img_ptr="*fp32", koff_ptr="*i32", voff_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32",
    acc_ptr="*fp32", best_ptr="*i64", u_ptr="*fp32", G="i32", M="i32", N="i32", S="i32", D="i32", E="i32",
    pixels_per_image="i32", entries_per_split="i32", key_scale="fp32",
)  # fmt: skip


@triton.jit
def softmax_reduce_kernel(
    q_ptr,  # (G, M, D) fp32, scaled to bits
    img_ptr,  # (N, C*H*W) uint8 or fp32
    koff_ptr,  # (G, S, D) int32 pixel offsets, -1 = zero padding
    voff_ptr,  # (G, S, E) int32
    m_ptr,  # (SPLITS, G, M) fp32 out
    l_ptr,  # (SPLITS, G, M) fp32 out
    acc_ptr,  # (SPLITS, G, M, E) fp32 out
    best_ptr,  # (SPLITS, G, M) int64 out: local id n * S + s
    u_ptr,  # (SPLITS, G, M) fp32 out
    G,
    M,
    N,
    S,
    D,
    E,
    pixels_per_image,
    entries_per_split,
    key_scale,  # c = a^2/T log2 e
    IS_UINT8: tl.constexpr,
    PROVENANCE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    VALUE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_ge = tl.program_id(1)
    split = tl.program_id(2)
    e_blocks = tl.cdiv(E, BLOCK_E)
    g = pid_ge // e_blocks
    e0 = (pid_ge % e_blocks) * BLOCK_E

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    d_range = tl.arange(0, BLOCK_D)
    e_range = e0 + tl.arange(0, BLOCK_E)
    e_ok = e_range < E
    q_base = q_ptr + (g.to(tl.int64) * M + rows.to(tl.int64)) * D  # (BLOCK_M,)
    koff_base = koff_ptr + g.to(tl.int64) * S * D
    voff_base = voff_ptr + g.to(tl.int64) * S * E

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    u_i = tl.zeros((BLOCK_M,), tl.float32)
    best_i = tl.full((BLOCK_M,), -1, tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)

    total = N.to(tl.int64) * S
    start = split.to(tl.int64) * entries_per_split
    stop = tl.minimum(start + entries_per_split, total)
    for j0 in range(start, stop, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)  # entry j = s * N + n
        j_ok = j < stop
        s = j // N
        n = j - s * N
        image = img_ptr + n * pixels_per_image  # (BLOCK_N,) 64-bit
        qk = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        kk = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + d_range
            d_ok = d < D
            q = tl.load(q_base[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            off = tl.load(koff_base + s[:, None] * D + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=-1)
            k = tl.load(image[:, None] + tl.maximum(off, 0), mask=off >= 0, other=0).to(tl.float32)
            if IS_UINT8:
                k = tl.where(off >= 0, k / 127.5 - 1.0, 0.0)
            kk += tl.sum(k * k, axis=1)
            qk += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        logits = tl.where(j_ok[None, :], qk - key_scale * kk[None, :], float("-inf"))

        tile_max = tl.max(logits, axis=1)
        m_new = tl.maximum(m_i, tile_max)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(logits - m_new[:, None])
        if PROVENANCE:
            tile_arg = tl.argmax(logits, axis=1)
            tile_best = tl.sum(tl.where(tl.arange(0, BLOCK_N)[None, :] == tile_arg[:, None], j[None, :], 0), axis=1)
            local = (tile_best % N) * S + tile_best // N
            best_i = tl.where(tile_max > m_i, local, best_i)
            shift = tl.where(l_i > 0, m_i - m_new, 0.0)
            u_i = alpha * (u_i + shift * l_i) + tl.sum(p * tl.where(p > 0, logits - m_new[:, None], 0.0), axis=1)
        l_i = alpha * l_i + tl.sum(p, axis=1)

        voff = tl.load(voff_base + s[:, None] * E + e_range[None, :], mask=j_ok[:, None] & e_ok[None, :], other=0)
        v = tl.load(image[:, None] + voff, mask=j_ok[:, None] & e_ok[None, :], other=0).to(tl.float32)
        if IS_UINT8:
            v = v / 127.5 - 1.0
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=VALUE_PRECISION)
        m_i = m_new

    out = (split.to(tl.int64) * G + g) * M + rows
    acc_ptrs = acc_ptr + out[:, None] * E + e_range[None, :]
    tl.store(acc_ptrs, acc, mask=row_ok[:, None] & e_ok[None, :])
    if e0 == 0:
        tl.store(m_ptr + out, m_i, mask=row_ok)
        tl.store(l_ptr + out, l_i, mask=row_ok)
        if PROVENANCE:
            tl.store(best_ptr + out, best_i, mask=row_ok)
            tl.store(u_ptr + out, u_i, mask=row_ok)


def launch_config(
    D: int,
    E: int,
    *,
    is_uint8: bool,
    provenance: bool,
    dot_precision: str,
    block_m: int,
    block_n: int,
    block_e: int,
) -> dict:
    """The compile-time arguments `launch_softmax_reduce` passes for keys of D features and values of E channels
    (constexprs, num_warps, num_stages): one place for the launcher and the static cost tool
    (benchmarks/static_cost.py), so that the tool compiles exactly what a launch compiles."""
    return dict(
        IS_UINT8=is_uint8,
        PROVENANCE=provenance,
        DOT_PRECISION=dot_precision,
        VALUE_PRECISION="ieee" if dot_precision == "ieee" else "tf32x3",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=min(128, max(16, triton.next_power_of_2(D))),  # a GPU tl.dot needs K >= 16
        BLOCK_E=block_e,
        num_warps=4,  # Triton's defaults, written out
        num_stages=3,
    )


def launch_softmax_reduce(
    q: torch.Tensor,
    images: torch.Tensor,
    key_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    key_scale: float,
    *,
    splits: int,
    entries_per_split: int,
    provenance: bool,
    dot_precision: str,
    block_m: int,
    block_n: int,
    block_e: int,
) -> tuple[torch.Tensor, ...]:
    """Run `softmax_reduce_kernel`; returns the partial states `(m, l, acc, best, u)`, each with a leading
    `(splits,)` axis: m, l, u `(splits, G, M)` fp32, acc `(splits, G, M, E)` fp32, best `(splits, G, M)` int64
    local ids `n * S + s` (-1 for an empty split); best and u are None without provenance.

    `splits` programs per (query block, group, value block) fold `entries_per_split` consecutive entries each (a
    multiple of `block_n`; `elsfast.reduce.partials.plan_splits`). `block_e`: values per program (>= 16).

    q `(G, M, D)` fp32 contiguous in bits; images `(N, C*H*W)` uint8 or fp32; key_offsets `(G, S, D)` and
    value_offsets `(G, S, E)` int32, all on one device; key_scale c of the logit q.k - c |k|^2
    (`elsfast.reduce.partials.KernelInputs`). `block_m`, `block_n`: tile sizes (powers of two; on a
    GPU at least 16, the smallest `tl.dot` shape)."""
    G, M, D = q.shape
    N = images.shape[0]
    S, E = key_offsets.shape[1], value_offsets.shape[2]
    config = launch_config(
        D, E, is_uint8=images.dtype == torch.uint8, provenance=provenance, dot_precision=dot_precision,
        block_m=block_m, block_n=block_n, block_e=block_e,
    )  # fmt: skip
    device = q.device
    m = torch.empty(splits, G, M, dtype=torch.float32, device=device)
    l = torch.empty_like(m)
    acc = torch.empty(splits, G, M, E, dtype=torch.float32, device=device)
    best = torch.empty(splits, G, M, dtype=torch.int64, device=device) if provenance else m
    u = torch.empty_like(m) if provenance else m
    grid = (triton.cdiv(M, block_m), G * triton.cdiv(E, block_e), splits)
    softmax_reduce_kernel[grid](
        q, images, key_offsets, value_offsets, m, l, acc, best, u,
        G, M, N, S, D, E, images.shape[1], entries_per_split, key_scale,
        **config,
    )  # fmt: skip
    return m, l, acc, (best if provenance else None), (u if provenance else None)
