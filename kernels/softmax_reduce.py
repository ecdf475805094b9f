"""Fused Triton kernel of the patch-softmax core (SPEC section 5), installed as `elsfast.kernels.softmax_reduce`.

What it computes. For queries q `(G, M, D)` (in bits, q' = q 2a/T log2 e) and a dictionary given by training
images and offset tables (`Dictionary.pixel_offsets`), each program folds a range of the dictionary's entries into
a streaming log-sum-exp state for BLOCK_M queries of one group:

    s_j  = q'.k_j - c |k_j|^2                 (bits; c = a^2/T log2 e; the |q|^2 term cancels in the softmax)
    m    = max_j s_j,  l = sum_j 2^(s_j - m),  acc = sum_j 2^(s_j - m) v_j
    best = the entry of largest s_j (lowest id on ties),  u = sum_j 2^(s_j - m) (s_j - m)   (provenance)

Built like FlashAttention-2. Entries are walked in tiles of BLOCK_N images at one position s (entry
j = s * N + n, the order of every backend), so a tile's offset row `key_offsets[g, s]` is loaded once and
broadcast, its image rows are consecutive and the entry's image and position are scalars: no division in the
loop. Keys are gathered from the images on the fly (the patch dictionary is never materialised); the last tile
of a row s is the only one with entries past N, and it is masked through its keys' norms (|k|^2 = +inf gives a
logit of -inf), not per element. Queries are loaded once per program, outside the entry loop, when the key
dimension fits one chunk (D <= 128). Longer keys walk 64-feature chunks: the queries of as many leading chunks as
shared memory holds (RESIDENT_CHUNKS; all of them up to P = 11 on CIFAR-10) are loaded once per program too and
stay in shared memory, their chunks unrolled in the entry loop (FlashAttention-3's resident Q tile); the rest run
in a runtime loop (so that they share their shared-memory buffers) and reload their query chunk every tile. The
query halves are zero-padded on the host so that their loads are aligned and unmasked. p.v runs as E FMAs per
pair (patch values, E <= 4) instead of a GEMM padded to 16; whole-image values (IS/ES, E > 4) keep `tl.dot` over
BLOCK_E-channel blocks. Tiles, warps, stages and resident chunks per (D, E) come from `launch_config`, which also
re-plans tiles over the device's shared-memory budget (`SHARED_MEMORY_LIMIT` on sm_90).

Precision (DOT_PRECISION):
- "fp16x2" (uint8 images): keys are the exact integers k = 2u - 255 (k / 255 is the pixel in [-1, 1]; 0 for
  zero padding), exact in fp16, with the 1/255 folded into the queries and |k|^2 summed exactly in fp32
  (< 2^24). The queries, scaled by a power of two 2^sigma into fp16's range, are split q = q_hi + q_lo + r
  (q_hi = fp16(q), q_lo = fp16(q - q_hi)), and q.k = q_hi.k + q_lo.k runs as two fp16 tensor-core passes with
  exact products and fp32 accumulation. Error bound of a logit s (bits), with L = sum_f |q'_f k_f| + c |k|^2
  (k in pixel units, L <= |q'| |k| + c |k|^2) and eps = eps32 = 2^-23:
      |r_f| <= 2^-22 |q_f| (+ 2^-25 2^-sigma absolute, fp16 subnormals: negligible after the scaling)
      -> split error          <= 2^-22 sum_f |q'_f k_f|           =  2 eps L
      2D fp32 accumulations   <= 2D eps sum_f |q'_f k_f|          (tensor cores may truncate: eps, not eps/2)
      scale, subtract c |k|^2 <= 2 eps L
      total |ds| <= (2D + 4) eps L bits, against (D + 2) eps L for an fp32 FMA dot; in practice the
      accumulation errors are random and the kernel stays within the fp32 backends' tolerance (tests).
- "tf32" (fp32 images, only at very high noise): operands truncated to tf32, |ds| <= 2^-9 sum_f |q'_f k_f|
  (see `elsfast.reduce.triton_backend.dot_precision`); "tf32x3" (fp32 images): three tf32 products,
  fp32-grade; "ieee": plain fp32 FMAs (BLOCK_D <= 32 so that it spills little).
The weighted value sums of a tile are fp32 FMAs (uint8 values as exact integers 2u - 255, scaled by 1/255 at the
store). The interpreter (TRITON_INTERPRET=1) computes every dot in fp32 whatever the setting.

Running state. A program folds up to ~10^5 tiles (all 60,000 MNIST digits at P = 3 in two splits): fp32 running
sums would lose 1e-3 relative there. So each tile's sums l, acc, u are taken in fp32 (a tree sum over at most
BLOCK_N entries) and folded into fp64 running sums. The weights are taken against an integral reference
r >= every logit seen (r = the largest ceil(tile max)), so that the rescale 2^(r_old - r_new) is an exact power of
two (`_pow2`, no exponential) and the fp64 sums stay exact under it; the true maximum x is kept beside r, and the
sums are moved to it once, at the store (times 2^(r - x) in [1, 2), in fp64). A weight is still one fp32 ex2
(relative error ~2^-22, like a logit error of 3e-7 bits) and a tile's sum carries log2(BLOCK_N) + BLOCK_N / 32
fp32 roundings at most; the bound declared for the backend is derived in docs/design.md ("Error bounds of the
GPU kernels").

Differences from the torch backend: the same state and the same entry order within a split, one pass instead of
chunks and tiles of a memory budget; fp32 only (float64 queries run on torch).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

__all__ = [
    "KERNEL_SIGNATURE",
    "SHARED_MEMORY_LIMIT",
    "TUNING_TILES",
    "TUNING_WARPS",
    "kernel_integers",
    "launch_config",
    "launch_softmax_reduce",
    "shared_memory_estimate",
    "softmax_reduce_kernel",
    "split_queries",
    "tuning_space",
]

# bytes of shared memory one block may use on sm_90 (CUDA guide, CC 9.0; 163 KB on sm_80, 99 KB on sm_86/89: the
# launcher passes its device's own limit to `launch_config`)
SHARED_MEMORY_LIMIT = 227 * 1024

# The runtime arguments of `softmax_reduce_kernel` and their Triton types (uint8 images: img_ptr "*u8"), for ahead-of-
# time compiles (benchmarks/static_cost.py, tests) that must match what the launcher passes.
KERNEL_SIGNATURE = dict(
    q_ptr="*fp32", qhi_ptr="*fp16", qlo_ptr="*fp16", img_ptr="*fp32", koff_ptr="*i32", voff_ptr="*i32",
    m_ptr="*fp32", l_ptr="*fp64", acc_ptr="*fp64", best_ptr="*i64", u_ptr="*fp64", G="i32", M="i32", N="i32",
    S="i32", pixels_per_image="i32", tiles_per_split="i32", key_scale="fp32", dot_scale="fp32", value_scale="fp32",
    M_PAD="i32",
)  # fmt: skip


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    # tl.exp2 lowers to ex2.approx.f32 plus a denormal fix-up (3 more instructions); the flush-to-zero form is one
    # MUFU.EX2, and weights below 2^-126 of the largest are negligible. The interpreter has no inline PTX.
    if FAST:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _pow2(k):
    """2^k exactly in fp64 for integral fp32 k <= 0 (0 below 2^-1022 and for k = -inf): the exponent field built from
    k, so that rescaling the fp64 running sums by it is exact."""
    biased = tl.maximum(k, -1023.0).to(tl.int64) + 1023
    return (biased << 52).to(tl.float64, bitcast=True)


@triton.jit
def _key_chunk(
    img_tile,
    rows,
    koff_row,
    c0,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_UINT8: tl.constexpr,
    FEATURE_MAJOR: tl.constexpr,
):
    """Keys of one tile, features [c0, c0 + BLOCK_D), transposed: (BLOCK_D, BLOCK_N) fp32 (exact integers 2u - 255
    for uint8 images, 0 for zero padding and for features past D).

    FEATURE_MAJOR gathers them as a (BLOCK_D, BLOCK_N) tensor, whose layout puts a warp's lanes on consecutive
    features of one image: each lane loads a different offset (one load per lane and chunk, not one per key) and
    a warp's pixels lie in a few runs of one image row. Otherwise as (BLOCK_N, BLOCK_D), lanes on images: the
    offsets are loaded per key (the same address across a warp), but a key's features are in one thread, so that
    |k|^2 sums without shuffles (cheaper when the tile has one chunk)."""
    d = c0 + tl.arange(0, BLOCK_D)
    off = tl.load(koff_row + d, mask=d < D, other=-1)  # one offset row per tile, broadcast over its entries
    valid = off >= 0
    two = tl.where(valid, 2.0, 0.0)
    shift = tl.where(valid, -255.0, 0.0)
    scale = tl.where(valid, 1.0, 0.0)
    # unmasked loads: padded features read pixel 0 of the row and are zeroed by the (per-feature) scale below
    if FEATURE_MAJOR:
        pix = tl.load(img_tile + tl.maximum(off, 0)[:, None] + rows[None, :])
        kt = pix.to(tl.float32) * two[:, None] + shift[:, None] if IS_UINT8 else pix * scale[:, None]
    else:
        pix = tl.load(img_tile + rows[:, None] + tl.maximum(off, 0)[None, :])
        k = pix.to(tl.float32) * two[None, :] + shift[None, :] if IS_UINT8 else pix * scale[None, :]
        kt = tl.trans(k)
    return kt


@triton.jit
def _query_chunk(
    q_ptr, qhi_ptr, qlo_ptr, q_row, q16, row_ok, c0, D: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT16: tl.constexpr
):
    """Queries of one key chunk, features [c0, c0 + BLOCK_D): the fp16 halves (zero-padded on the host: unmasked
    loads) with fp16x2, else the fp32 queries twice (masked)."""
    if SPLIT16:
        q_hi = tl.load(qhi_ptr + q16 + c0)
        q_lo = tl.load(qlo_ptr + q16 + c0)
    else:
        d = c0 + tl.arange(0, BLOCK_D)
        q_hi = tl.load(q_ptr + q_row[:, None] + d[None, :], mask=row_ok[:, None] & (d < D)[None, :], other=0.0)
        q_lo = q_hi
    return q_hi, q_lo


@triton.jit
def _value(ptrs, IS_UINT8: tl.constexpr):
    """Values at `ptrs` as fp32: uint8 pixels as the exact integers 2u - 255 (255 x the pixel in [-1, 1])."""
    v = tl.load(ptrs).to(tl.float32)
    if IS_UINT8:
        v = v * 2.0 - 255.0
    return v


@triton.jit
def _distance_dot(q_hi, q_lo, q_f32, k, qk, SPLIT16: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """qk + q.k for one transposed key chunk k (BLOCK_D, BLOCK_N) fp32: two fp16 passes over the queries' halves
    (integer keys are exact in fp16), or one tl.dot at DOT_PRECISION over the fp32 queries."""
    if SPLIT16:
        kt = k.to(tl.float16)
        qk = tl.dot(q_hi, kt, qk)
        qk = tl.dot(q_lo, kt, qk)
    else:
        qk = tl.dot(q_f32, k, qk, input_precision=DOT_PRECISION)
    return qk


@triton.jit
def softmax_reduce_kernel(
    q_ptr,  # (G, M, D) fp32 queries in bits (uint8 images: divided by 255); unused with fp16x2
    qhi_ptr,  # (G, M_PAD, D_PAD) fp16, zero-padded: the high and low halves of q 2^sigma (fp16x2 only)
    qlo_ptr,
    img_ptr,  # (N, C*H*W) uint8 or fp32
    koff_ptr,  # (G, S, D) int32 pixel offsets, -1 = zero padding
    voff_ptr,  # (G, S, E) int32
    m_ptr,  # (SPLITS, G, M) fp32 out: the largest logit (bits)
    l_ptr,  # (SPLITS, G, M) fp64 out
    acc_ptr,  # (SPLITS, G, M, E) fp64 out
    best_ptr,  # (SPLITS, G, M) int64 out: local id n * S + s
    u_ptr,  # (SPLITS, G, M) fp64 out
    G,
    M,
    N,
    S,
    pixels_per_image,
    tiles_per_split,  # tiles (BLOCK_N images at one position) per split
    key_scale,  # c of the logit (uint8: c / 255^2, for integer keys)
    dot_scale,  # 2^-sigma: undoes the queries' power-of-two scaling (1 without fp16x2)
    value_scale,  # 1/255 for uint8 images (integer values), 1 otherwise
    M_PAD,  # rows of the query halves per group: a multiple of BLOCK_M
    D: tl.constexpr,
    D_PAD: tl.constexpr,  # row stride of the query halves: CHUNKS * BLOCK_D
    E: tl.constexpr,
    IS_UINT8: tl.constexpr,
    PROVENANCE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    FAST_EXP2: tl.constexpr,
    RESIDENT_CHUNKS: tl.constexpr,  # leading key chunks whose queries are loaded once per program (<= CHUNKS)
    FEATURE_MAJOR: tl.constexpr,  # key gathers with a warp's lanes on features (see _key_chunk)
):
    CHUNKS: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    VALUE_FMA: tl.constexpr = E <= 4
    SPLIT16: tl.constexpr = DOT_PRECISION == "fp16x2"
    pid_m = tl.program_id(0)
    pid_ge = tl.program_id(1)
    split = tl.program_id(2)
    e_blocks = tl.cdiv(E, BLOCK_E)
    g = pid_ge // e_blocks
    e0 = (pid_ge % e_blocks) * BLOCK_E

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    q_row = (g.to(tl.int64) * M + rows.to(tl.int64)) * D  # (BLOCK_M,)
    koff_base = koff_ptr + g.to(tl.int64) * S * D
    voff_base = voff_ptr + g.to(tl.int64) * S * E
    n_range = tl.arange(0, BLOCK_N)
    e_range = e0 + tl.arange(0, BLOCK_E)
    e_ok = e_range < E

    # queries of the first RESIDENT_CHUNKS key chunks once per program, outside the entry loop (FlashAttention-3's
    # resident Q tile: the compiler keeps them in shared memory, where the tensor cores read them every tile)
    d_range = tl.arange(0, BLOCK_D)
    # the halves are zero-padded to whole tiles: aligned, unmasked, vectorised loads
    q16 = (g.to(tl.int64) * M_PAD + rows.to(tl.int64))[:, None] * D_PAD + d_range[None, :]
    q_his = ()
    q_los = ()
    for rc in tl.static_range(RESIDENT_CHUNKS):
        q_hi, q_lo = _query_chunk(q_ptr, qhi_ptr, qlo_ptr, q_row, q16, row_ok, rc * BLOCK_D, D, BLOCK_D, SPLIT16)
        q_his = q_his + (q_hi,)  # noqa: RUF005 (the Triton frontend has no starred tuples)
        q_los = q_los + (q_lo,)  # noqa: RUF005

    # The running state (see "Running state" in the module docstring): the true maximum x_i, an integral reference
    # r_i >= x_i the weights are taken against, and fp64 sums relative to r_i, each tile's fp32 sums folded in.
    x_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    r_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float64)
    u_i = tl.zeros((BLOCK_M,), tl.float64)
    best_i = tl.full((BLOCK_M,), -1, tl.int64)
    acc0 = tl.zeros((BLOCK_M,), tl.float64)
    acc1 = tl.zeros((BLOCK_M,), tl.float64)
    acc2 = tl.zeros((BLOCK_M,), tl.float64)
    acc3 = tl.zeros((BLOCK_M,), tl.float64)
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float64)

    tiles_per_row = tl.cdiv(N, BLOCK_N)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, S * tiles_per_row)
    image_rows = n_range * pixels_per_image  # (BLOCK_N,) int32 offsets of a tile's image rows
    for t in range(first, last):
        s = t // tiles_per_row  # scalars: one position s and BLOCK_N consecutive images n0 ... per tile
        n0 = (t - s * tiles_per_row) * BLOCK_N
        img_tile = img_ptr + n0.to(tl.int64) * pixels_per_image
        koff_row = koff_base + s.to(tl.int64) * D
        n_ok = n0 + n_range < N
        # entries past N (last tile of a row) read row N - 1 and are dropped through their norm below
        tile_rows = tl.where(n_ok, image_rows, (N - 1 - n0) * pixels_per_image)

        qk = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        kk = tl.zeros((BLOCK_N,), tl.float32)
        kk2 = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # FEATURE_MAJOR: |k|^2 summed across lanes once per tile
        for rc in tl.static_range(RESIDENT_CHUNKS):  # unrolled: the queries stay where they were loaded
            k = _key_chunk(img_tile, tile_rows, koff_row, rc * BLOCK_D, D, BLOCK_D, IS_UINT8, FEATURE_MAJOR)
            # exact for integer keys: every partial sum is an integer < 2^24
            if FEATURE_MAJOR:
                kk2 += k * k
            else:
                kk += tl.sum(k * k, axis=0)
            qk = _distance_dot(q_his[rc], q_los[rc], q_his[rc], k, qk, SPLIT16, DOT_PRECISION)
        if RESIDENT_CHUNKS < CHUNKS:
            # the other chunks in a runtime loop (not unrolled), so that they share their shared-memory buffers,
            # reloading their queries every tile
            for c in range(RESIDENT_CHUNKS, CHUNKS):
                k = _key_chunk(img_tile, tile_rows, koff_row, c * BLOCK_D, D, BLOCK_D, IS_UINT8, FEATURE_MAJOR)
                if FEATURE_MAJOR:
                    kk2 += k * k
                else:
                    kk += tl.sum(k * k, axis=0)
                q_hi, q_lo = _query_chunk(q_ptr, qhi_ptr, qlo_ptr, q_row, q16, row_ok, c * BLOCK_D, D, BLOCK_D, SPLIT16)
                qk = _distance_dot(q_hi, q_lo, q_hi, k, qk, SPLIT16, DOT_PRECISION)
        if FEATURE_MAJOR:
            kk = tl.sum(kk2, axis=0)
        ckk = tl.where(n_ok, key_scale * kk, float("inf"))
        logits = qk * dot_scale - ckk[None, :]

        tile_max = tl.max(logits, axis=1)
        r_new = tl.maximum(r_i, tl.ceil(tile_max))
        alpha = _pow2(r_i - r_new)  # exact; 0 on the first tile (r_i = -inf)
        shifted = logits - r_new[:, None]
        p = _exp2(shifted, FAST_EXP2)  # <= 1
        if PROVENANCE:
            # on equal maxima the lowest local id n * S + s (ReduceState.merge_): in a tile (one position s,
            # images n0 ...) the first of equal logits; against the running maximum, the lower of the two ids
            tile_arg = tl.argmax(logits, axis=1)
            local = (n0 + tile_arg).to(tl.int64) * S + s
            tied = (tile_max == x_i) & (tile_max > float("-inf"))
            best_i = tl.where(tile_max > x_i, local, tl.where(tied, tl.minimum(best_i, local), best_i))
            shift = tl.where(l_i > 0, r_i - r_new, 0.0).to(tl.float64)
            # dropped entries have p = 0 and shifted = -inf: clamp so that 0 * shifted is 0, not nan
            u_tile = tl.sum(p * tl.maximum(shifted, -3.0e38), axis=1)
            u_i = alpha * (u_i + shift * l_i) + u_tile.to(tl.float64)
        l_i = alpha * l_i + tl.sum(p, axis=1).to(tl.float64)
        x_i = tl.maximum(x_i, tile_max)

        voff_row = voff_base + s.to(tl.int64) * E
        if VALUE_FMA:
            # E FMAs per pair; a value is one pixel of the tile's image rows, its offset one scalar per tile
            v0 = _value(img_tile + tile_rows + tl.load(voff_row), IS_UINT8)
            acc0 = acc0 * alpha + tl.sum(p * v0[None, :], axis=1).to(tl.float64)
            if E > 1:
                v1 = _value(img_tile + tile_rows + tl.load(voff_row + 1), IS_UINT8)
                acc1 = acc1 * alpha + tl.sum(p * v1[None, :], axis=1).to(tl.float64)
            if E > 2:
                v2 = _value(img_tile + tile_rows + tl.load(voff_row + 2), IS_UINT8)
                acc2 = acc2 * alpha + tl.sum(p * v2[None, :], axis=1).to(tl.float64)
            if E > 3:
                v3 = _value(img_tile + tile_rows + tl.load(voff_row + 3), IS_UINT8)
                acc3 = acc3 * alpha + tl.sum(p * v3[None, :], axis=1).to(tl.float64)
        else:
            voff = tl.load(voff_row + e_range, mask=e_ok, other=0)
            v = tl.load(img_tile + tile_rows[:, None] + voff[None, :], mask=e_ok[None, :], other=0).to(tl.float32)
            if IS_UINT8:
                v = tl.where(e_ok[None, :], v * 2.0 - 255.0, 0.0)
            pv = tl.dot(p, v, input_precision="ieee" if DOT_PRECISION == "ieee" else "tf32x3")
            acc = acc * alpha[:, None] + pv.to(tl.float64)
        r_i = r_new

    # Sums relative to the true maximum x_i (as ReduceState keeps them): times c = 2^(r_i - x_i), in [1, 2).
    gap = tl.where(x_i > float("-inf"), r_i - x_i, 0.0).to(tl.float64)
    c = tl.exp2(gap) * value_scale  # uint8 values were the integers 2u - 255: 1/255 maps them to [-1, 1]
    out = (split.to(tl.int64) * G + g) * M + rows
    if VALUE_FMA:
        tl.store(acc_ptr + out * E, acc0 * c, mask=row_ok)
        if E > 1:
            tl.store(acc_ptr + out * E + 1, acc1 * c, mask=row_ok)
        if E > 2:
            tl.store(acc_ptr + out * E + 2, acc2 * c, mask=row_ok)
        if E > 3:
            tl.store(acc_ptr + out * E + 3, acc3 * c, mask=row_ok)
    else:
        acc_ptrs = acc_ptr + out[:, None] * E + e_range[None, :]
        tl.store(acc_ptrs, acc * c[:, None], mask=row_ok[:, None] & e_ok[None, :])
    if e0 == 0:
        c = tl.exp2(gap)
        tl.store(m_ptr + out, x_i, mask=row_ok)
        tl.store(l_ptr + out, l_i * c, mask=row_ok)
        if PROVENANCE:
            tl.store(best_ptr + out, best_i, mask=row_ok)
            tl.store(u_ptr + out, c * (u_i + gap * l_i), mask=row_ok)


def split_queries(q: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`(q_hi, q_lo, dot_scale)` for "fp16x2": q 2^sigma = q_hi + q_lo + r with fp16 halves, sigma chosen so that
    the largest |q| 2^sigma lies in [2^13, 2^14) (far from fp16's overflow at 65504 and its subnormals), and
    dot_scale = 2^-sigma. q `(G, M, D)` fp32; the halves are `(G, rows, columns)`, zero beyond `(M, D)`."""
    G, M, D = q.shape
    largest = float(q.abs().max()) if q.numel() else 0.0
    sigma = 0 if largest == 0.0 or not math.isfinite(largest) else 13 - math.floor(math.log2(largest))
    sigma = max(-100, min(100, sigma))
    scaled = torch.zeros(G, rows, columns, dtype=torch.float32, device=q.device)
    scaled[:, :M, :D] = q * 2.0**sigma
    q_hi = scaled.to(torch.float16)
    q_lo = (scaled - q_hi.float()).to(torch.float16)
    return q_hi, q_lo, 2.0**-sigma


def shared_memory_estimate(config: dict) -> int:
    """An upper bound on the shared memory (bytes) `softmax_reduce_kernel` compiles to for these compile-time
    arguments: the resident query chunks (loaded once per program and kept in shared memory for the tensor cores),
    the operands of a streamed chunk (keys, and queries of the chunks that are reloaded every tile; fp16 halves, or
    fp32 and their tf32 splits) times the pipeline stages, plus the scratch of the layout conversions and
    reductions (a (BLOCK_M, BLOCK_N) tile when p feeds a GEMM, E > 4; else per-warp partials of a row vector).
    Checked against the compiled kernels in tests/test_gpu_kernels_static.py."""
    bm, bn, bd = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_D"]
    itemsize = 2 if config["DOT_PRECISION"] == "fp16x2" else 4
    halves = 2 if config["DOT_PRECISION"] in ("fp16x2", "tf32x3") else 1  # queries: fp16 or tf32 hi and lo
    key_halves = 2 if config["DOT_PRECISION"] == "tf32x3" else 1  # integer keys are one exact fp16 operand
    chunks = -(-config["D"] // bd)
    resident = config.get("RESIDENT_CHUNKS", 0)
    query_chunk = bm * bd * itemsize * halves
    streamed = bn * bd * itemsize * key_halves + (query_chunk if resident < chunks else 0)
    if config["E"] <= 4:
        scratch = max(bm, bn) * 4 * config.get("num_warps", 8)
    else:
        scratch = bm * bn * 4 + (bm * bn + bn * config["BLOCK_E"]) * 4 * 2
    return resident * query_chunk + streamed * max(1, config["num_stages"]) + scratch


def launch_config(
    D: int,
    E: int,
    *,
    is_uint8: bool,
    provenance: bool,
    dot_precision: str,
    block_m: int | None = None,
    block_n: int | None = None,
    block_e: int = 16,
    fast_exp2: bool = True,
    stages: int | None = None,
    resident_chunks: int | None = None,
    feature_major: bool | None = None,
    num_warps: int | None = None,
    shared_memory_limit: int = SHARED_MEMORY_LIMIT,
) -> dict:
    """The compile-time arguments `launch_softmax_reduce` passes for keys of D features and values of E channels:
    constexprs, num_warps and num_stages, in one place for the launcher and the static cost tool
    (benchmarks/static_cost.py), so that the tool compiles exactly what a launch compiles.

    Defaults per key dimension (chosen with the static tool, docs/performance.md), 8 warps and one stage: keys
    of one chunk (up to 128 features; 64 for tf32x3, 32 for ieee, which spilled 9.8 KB at 128) run 256 x 64
    tiles; longer keys 64-feature chunks and 128 x 128 tiles (128 x 64 with fp32 operands, with provenance at 5
    chunks or more (P >= 11), and when `feature_major` asks for feature-major gathers, see `_key_chunk`). Compiled
    as a launch specialises them (triton 3.6, issue 24), the feature-major 128 x 64 tiles the defaults were for
    fp16x2 keys of 4 chunks or more reached 255 registers and spilled 4-28 B at every P from 9 to 17; the
    entry-major tiles do not (144-225 registers). ieee's FMA dot
    still spills at D <= 32 with every tile tried (~100 B; 1.1 KB at P = 3 compiled as launched, triton 3.6.0:
    256 x 64, 128 x 64, 64 x 64). `block_m`, `block_n` override
    the tiles and `stages` the software-pipelining depth (two stages turned the gathers into cp.async with
    per-element bounds logic: 2x the instructions at P = 11). `num_warps` overrides the warps per program (8 from
    128 queries a tile, else 4).

    Resident queries (RESIDENT_CHUNKS): the queries of that many leading key chunks are loaded once per program,
    before the entry loop, and stay in shared memory (the compiler hoists their copy there), their chunks unrolled
    in the loop; the other chunks run in a runtime loop that reloads their queries every tile. One chunk: 1. Longer
    keys with fp16x2: as many as `shared_memory_limit` allows beside a key chunk (all 6 at P = 11, 200 KB on
    sm_90; 5 of 8 to 14 at P = 13 to 17); fp32 operands: 0. `resident_chunks` overrides.

    A config whose shared memory estimate exceeds `shared_memory_limit` (the launcher passes its device's,
    `SHARED_MEMORY_LIMIT` is sm_90's) is re-planned (fewer resident chunks, fewer stages, then a smaller BLOCK_N,
    then BLOCK_M) before launch, never handed to the GPU."""
    chunk = {"fp16x2": 128, "tf32": 128, "tf32x3": 64, "ieee": 32}[dot_precision]
    block_d = min(chunk, max(16, triton.next_power_of_2(D)))
    one_chunk = block_d >= D
    if not one_chunk:
        block_d = min(block_d, 64)  # longer keys loop over chunks; 128 fp32 features spilled (tf32, P = 11)
    chunks = triton.cdiv(D, block_d)
    # Feature-major key gathers (see _key_chunk), only when asked for: one offset load per lane and chunk instead
    # of one per key, but their |k|^2 partials (BLOCK_D x BLOCK_N fp32) need 64-entry tiles (128 spilled), and
    # those spilled too with the launch's specialisation (triton 3.6: 4-28 B at P = 9 to 17).
    feature_major = bool(feature_major)

    def warps(block_m: int) -> int:  # the warps of a program: `num_warps`, else 8 from 128 queries a tile, else 4
        return num_warps or (8 if block_m >= 128 else 4)

    # One chunk: queries stay resident and 256 x 64 tiles amortise a tile's gathers over 256 queries. Longer keys:
    # 128 queries, so that their chunks fit shared memory, and 128 entries (64 feature-major) per tile.
    # fp32 operands (tf32, tf32x3, ieee) of long keys need twice the registers: 128 x 64 (128 x 128 spilled).
    # Provenance (the best entry and its logit gap per query) at 5 chunks or more: 128 x 64 (128 x 128 reached
    # 255 registers with triton 3.6, no margin left).
    bm = block_m or (256 if one_chunk else 128)
    wide = not one_chunk and dot_precision == "fp16x2" and not feature_major and not (provenance and chunks >= 5)
    bn = block_n or (128 if wide else 64)
    config = dict(
        D=D,
        E=E,
        IS_UINT8=is_uint8,
        PROVENANCE=provenance,
        DOT_PRECISION=dot_precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=block_d,
        BLOCK_E=block_e,
        FAST_EXP2=fast_exp2,
        num_warps=warps(bm),
        num_stages=stages if stages is not None else 1,
        FEATURE_MAJOR=feature_major,
    )
    config["D_PAD"] = chunks * block_d
    # Keys of one chunk keep their queries resident (as before). With fp16x2, longer keys keep as many leading
    # chunks' queries resident as shared memory allows (FlashAttention-3's Q tile) and reload the rest every tile.
    if resident_chunks is not None:
        config["RESIDENT_CHUNKS"] = max(0, min(resident_chunks, chunks))
    elif one_chunk:
        config["RESIDENT_CHUNKS"] = 1
    elif dot_precision == "fp16x2":
        config["RESIDENT_CHUNKS"] = chunks
        while config["RESIDENT_CHUNKS"] > 0 and shared_memory_estimate(config) > shared_memory_limit:
            config["RESIDENT_CHUNKS"] -= 1
    else:
        config["RESIDENT_CHUNKS"] = 0
    while shared_memory_estimate(config) > shared_memory_limit:
        if config["RESIDENT_CHUNKS"] > (1 if one_chunk else 0):
            config["RESIDENT_CHUNKS"] -= 1
        elif config["num_stages"] > 1:
            config["num_stages"] -= 1
        elif config["BLOCK_N"] > 16:
            config["BLOCK_N"] //= 2
        elif config["BLOCK_M"] > 16:
            config["BLOCK_M"] //= 2
            config["num_warps"] = warps(config["BLOCK_M"])
        else:
            raise ValueError(f"no tile of D = {D}, E = {E} fits {shared_memory_limit} bytes of shared memory")
    return config


# The space `Triton(tune=True)` times (elsfast/reduce/tuning.py), around the defaults the static cost tool chose:
# the one-chunk default 256 x 64, the long-key defaults 128 x 128 and 128 x 64, and a small tile for few queries,
# each with 8 and 4 warps.
TUNING_TILES = ((256, 64), (128, 128), (128, 64), (64, 64))
TUNING_WARPS = (8, 4)


def tuning_space(D: int, E: int, **options) -> list[dict]:
    """The launch configs `Triton(tune=True)` times for keys of D features and E value channels: `launch_config`'s
    default first, then each (BLOCK_M, BLOCK_N) of `TUNING_TILES` with each num_warps of `TUNING_WARPS`, every one
    re-planned to fit `options["shared_memory_limit"]`, without duplicates. `options`: `launch_config`'s other
    keywords (precision, provenance, value block, ...)."""
    configs = [launch_config(D, E, **options)]
    for block_m, block_n in TUNING_TILES:
        for warps in TUNING_WARPS:
            config = launch_config(D, E, block_m=block_m, block_n=block_n, num_warps=warps, **options)
            if config not in configs:
                configs.append(config)
    return configs


def kernel_integers(
    G: int, M: int, N: int, S: int, pixels_per_image: int, tiles_per_split: int, config: dict
) -> dict[str, int]:
    """The integer runtime arguments of `softmax_reduce_kernel`, by name, exactly as `launch_softmax_reduce` passes
    them for G groups of M queries against N images of `pixels_per_image` values (C*H*W) at S positions, with
    `tiles_per_split` tiles per split and `config` (`launch_config`). A launch specialises them by value (an
    integer equal to 1 becomes a constant, one divisible by 16 gets a divisibility hint): the static cost tool
    (benchmarks/static_cost.py) derives its ahead-of-time compile from these values."""
    m_pad = max(1, triton.cdiv(M, config["BLOCK_M"])) * config["BLOCK_M"]
    return dict(G=G, M=M, N=N, S=S, pixels_per_image=pixels_per_image, tiles_per_split=tiles_per_split, M_PAD=m_pad)


def launch_softmax_reduce(
    q: torch.Tensor,
    images: torch.Tensor,
    key_offsets: torch.Tensor,
    value_offsets: torch.Tensor,
    key_scale: float,
    *,
    splits: int,
    tiles_per_split: int,
    config: dict,
) -> tuple[torch.Tensor, ...]:
    """Run `softmax_reduce_kernel` with `config` (`launch_config`); returns the partial states `(m, l, acc, best,
    u)`, each with a leading `(splits,)` axis: m `(splits, G, M)` fp32, l, u `(splits, G, M)` and acc `(splits, G,
    M, E)` fp64 (relative to m, each split's exact largest logit), best `(splits, G, M)` int64 local ids
    `n * S + s` (-1 for an empty split); best and u are None without provenance.

    `splits` programs per (query block, group, value block) fold `tiles_per_split` consecutive tiles each (a tile:
        `config["BLOCK_N"]` images at one position; `elsfast.reduce.partials.plan_splits`).

        q `(G, M, D)` fp32 contiguous in bits; images `(N, C*H*W)` uint8 or fp32; key_offsets `(G, S, D)` and
        value_offsets `(G, S, E)` int32, all on one device; key_scale c of the logit q.k - c |k|^2
        (`elsfast.reduce.partials.KernelInputs`). Launches on q's device."""
    G, M, _ = q.shape
    N = images.shape[0]
    S, E = key_offsets.shape[1], value_offsets.shape[2]
    uint8 = images.dtype == torch.uint8
    if uint8:  # integer keys and values 2u - 255 = 255 x pixel: fold the 1/255 into q, c and the values
        q, key_scale, value_scale = q / 255.0, key_scale / 255.0**2, 1.0 / 255.0
    else:
        value_scale = 1.0
    integers = kernel_integers(G, M, N, S, images.shape[1], tiles_per_split, config)
    m_pad = integers["M_PAD"]
    if config["DOT_PRECISION"] == "fp16x2":
        q_hi, q_lo, dot_scale = split_queries(q, m_pad, config["D_PAD"])
    else:
        q_hi = q_lo = torch.empty(1, dtype=torch.float16, device=q.device)
        dot_scale = 1.0
    device = q.device
    m = torch.empty(splits, G, M, dtype=torch.float32, device=device)
    l = torch.empty(splits, G, M, dtype=torch.float64, device=device)
    acc = torch.empty(splits, G, M, E, dtype=torch.float64, device=device)
    best = torch.empty(splits, G, M, dtype=torch.int64, device=device) if config["PROVENANCE"] else m
    u = torch.empty_like(l) if config["PROVENANCE"] else l
    grid = (triton.cdiv(M, config["BLOCK_M"]), G * triton.cdiv(E, config["BLOCK_E"]), splits)
    # on the tensors' device, not the current one (a launch on another device would read foreign pointers)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        softmax_reduce_kernel[grid](
            q.contiguous(), q_hi, q_lo, images, key_offsets, value_offsets, m, l, acc, best, u,
            key_scale=key_scale, dot_scale=dot_scale, value_scale=value_scale, **integers, **config,
        )  # fmt: skip
    provenance = config["PROVENANCE"]
    return m, l, acc, (best if provenance else None), (u if provenance else None)
