"""The fused GPU kernels' accumulation, emulated in numpy at sizes the Triton interpreter cannot reach (issue 24).

A Triton program folds up to ~10^5 tiles (all 60,000 MNIST digits at P = 3 in two splits); the interpreter spends
milliseconds a tile. This module replays what one program does with its tiles, in the kernel's order (entry
j = s N + n: tiles of `block_n` images at one position s, consecutive tiles to a split):

- logits in fp32 bits, s = q'.k - c |k|^2 (the kernel's dot order is not replayed: its logit error is the bound's
  other term);
- "fp64": each tile's sums l, acc in fp32 (numpy's float32 sums), weights against an integral reference r (the
  largest ceil of a tile's maximum), folded into fp64 sums rescaled by exact powers of two; the sums moved to the
  true maximum at the store (`softmax_reduce_kernel` since 2026-12);
- "fp32": the running state in fp32, l = 2^(m - m') l + tile sum (the kernels before 2026-12).
The splits' states are merged in float64 as `fold_partial_states` does. `tests/test_kernel_scale.py` checks the
emulation against the Triton kernel under the interpreter on small problems, then runs it on full-size ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from elsfast.reduce import PatchDictionary
from elsfast.reduce.state import logit_scales


def position_logits(q: np.ndarray, keys: np.ndarray, abar: float) -> np.ndarray:
    """fp32 logits in bits `(M, N)` of queries `(M, D)` against the keys `(N, D)` of one position (pixel units)."""
    q_scale, key_scale = logit_scales(abar)
    q32 = (q * np.float32(q_scale)).astype(np.float32)
    norms = np.einsum("nd,nd->n", keys, keys, dtype=np.float32)
    return (q32 @ keys.T - np.float32(key_scale) * norms).astype(np.float32)


def fold_tiles(logits: np.ndarray, values: np.ndarray, state: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold tiles in order: `logits` `(T, M, n)` fp32 bits and `values` `(T, n)` of T tiles; returns one split's
    `(m, l, acc)` `(M,)` float64 (l and acc relative to m, the split's largest logit)."""
    T, M, _ = logits.shape
    tile_max = logits.max(axis=2)  # (T, M)
    if state == "fp64":
        r = np.maximum.accumulate(np.ceil(tile_max), axis=0)  # the reference after each tile
        p = np.exp2(logits - r[:, :, None], dtype=np.float32)
        tile_l = p.sum(axis=2, dtype=np.float32)
        tile_acc = (p * values[:, None, :]).sum(axis=2, dtype=np.float32)
        scale = np.exp2(r - r[-1])  # exact powers of two: the rescales since each tile
        l, acc = (tile_l * scale).sum(axis=0, dtype=np.float64), (tile_acc * scale).sum(axis=0, dtype=np.float64)
        x = tile_max.max(axis=0)
        c = np.exp2(r[-1].astype(np.float64) - x)
        return x.astype(np.float64), l * c, acc * c
    if state != "fp32":
        raise ValueError(f"state must be 'fp64' or 'fp32', got {state!r}")
    m = np.full(M, -np.inf, np.float32)
    l = np.zeros(M, np.float32)
    acc = np.zeros(M, np.float32)
    for t in range(T):
        m_new = np.maximum(m, tile_max[t])
        alpha = np.exp2(m - m_new, dtype=np.float32)
        p = np.exp2(logits[t] - m_new[:, None], dtype=np.float32)
        l = (alpha * l + p.sum(axis=1, dtype=np.float32)).astype(np.float32)
        acc = (alpha * acc + (p * values[t]).sum(axis=1, dtype=np.float32)).astype(np.float32)
        m = m_new
    return m.astype(np.float64), l.astype(np.float64), acc.astype(np.float64)


def emulate(
    queries: torch.Tensor, dictionary: PatchDictionary, abar: float, *, block_n: int, splits: int, state: str
) -> np.ndarray:
    """The kernel's output `(M,)` for one-group queries `(1, M, D)` against a one-group, one-channel patch
    dictionary, with `splits` splits of consecutive tiles of `block_n` images at one position."""
    if dictionary.num_groups != 1 or dictionary.value_dim != 1:
        raise ValueError("the emulation takes one group and one value channel")
    q = queries[0].numpy().astype(np.float32)
    N, S = dictionary.num_images, dictionary.entries_per_image
    tiles_per_row = math.ceil(N / block_n)
    per_split = math.ceil(S * tiles_per_row / splits)
    padded = tiles_per_row * block_n
    states = []
    logits, values = [], []
    for s in range(S):  # one position at a time, in the kernel's order
        keys, vals = _position(dictionary, s)
        row = np.full((q.shape[0], padded), -np.inf, np.float32)
        row[:, :N] = position_logits(q, keys, abar)
        v = np.zeros(padded, np.float32)
        v[:N] = vals
        logits += list(row.reshape(q.shape[0], tiles_per_row, block_n).transpose(1, 0, 2))
        values += list(v.reshape(tiles_per_row, block_n))
        while len(logits) >= per_split or (s == S - 1 and logits):
            take = min(per_split, len(logits))
            states.append(fold_tiles(np.stack(logits[:take]), np.stack(values[:take]), state))
            del logits[:take], values[:take]
    m = np.stack([st[0] for st in states])
    top = m.max(axis=0)
    w = np.exp2(m - top)
    l = (w * np.stack([st[1] for st in states])).sum(axis=0)
    acc = (w * np.stack([st[2] for st in states])).sum(axis=0)
    return acc / l


def _position(dictionary: PatchDictionary, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys `(N, D)` and values `(N,)` of every image at position s (fp32, pixel units)."""
    one = PatchDictionary(
        dictionary.images, dictionary.patch_size, dictionary.padding, dictionary.positions[:, s : s + 1]
    )
    keys, values = one.entries(0, dictionary.num_images, torch.float32)
    return keys[0].numpy(), values[0, :, 0].numpy()
