"""Provenance of the torch path that does not depend on how the dictionary is cut: each tile's dominant logit in an
order fixed by D alone, and each distinct key once per chunk.

A matrix product's result for one (query, key) pair depends in the last bit on the product's shape and on the
pair's place in it (BLAS kernels block, unroll and split by shape). Two identical patches in different chunks,
tiles or shards then get logits an ulp apart, and "the lowest id among equal maxima" (`ReduceState.merge_`, across
ranks `all_merge_`) names whichever copy the rounding favoured: a sharded run and one process disagreed on 6 of
1,568 MNIST pixels in float64. With provenance the torch path therefore

- computes every key norm and each tile's dominant logit with `fixed_order_dot`: a function of the query and the
  key alone, bit for bit, so identical patches tie exactly wherever they are;
- reduces each chunk over its distinct keys (`distinct_entries`): an entry that stands for c identical ones weighs
  c times as much and carries the lowest id among them, so the copies of a key in a tile need no sorting out;
- finds each tile's fixed-order maximum with `exact_peak`: the GEMM's argmax is recomputed, and so is any other
  key whose GEMM logit lies within the GEMM's rounding of it (rare: a near tie between different patches).

Only the dominant logit `m` and the id `best` of a tile's state change; the sums are still those of the GEMM's
logits, relative to that `m`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["DistinctEntries", "distinct_entries", "exact_peak", "fixed_order_dot", "key_classes", "peak_window"]

NO_ID = torch.iinfo(torch.int64).max


BLOCK_ELEMENTS = 1 << 17  # products summed at once by `fixed_order_dot`: a block stays in cache while it is halved


def fixed_order_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot products over the last axis of `a` and `b` (broadcast against each other), summed pairwise in an order
    fixed by the length D alone (while w > 1 values remain, element i + ceil(w / 2) is added to element i), with
    elementwise operations only, so that each result is a function of its two vectors, bit for bit, whatever the
    shapes and positions. Error at most gamma_(ceil(log2 D) + 1) sum |a b| (gamma_k = k u / (1 - k u))."""
    shape = torch.broadcast_shapes(a.shape, b.shape)
    D = shape[-1]
    if math.prod(shape) <= BLOCK_ELEMENTS:  # one block (a tile's queries): no copy into an output
        p = a * b
        while D > 1:
            half = (D + 1) // 2
            p[..., : D - half] += p[..., half:D]
            D = half
        return p[..., 0]
    a, b = a.expand(shape).reshape(-1, D), b.expand(shape).reshape(-1, D)
    out = torch.empty(a.shape[0], dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    rows = max(1, BLOCK_ELEMENTS // D)
    for r0 in range(0, a.shape[0], rows):
        p = a[r0 : r0 + rows] * b[r0 : r0 + rows]
        width = D
        while width > 1:
            half = (width + 1) // 2
            p[:, : width - half] += p[:, half:width]
            width = half
        out[r0 : r0 + rows] = p[:, 0]
    return out.view(shape[:-1])


def _lexicographic_classes(rows: torch.Tensor) -> torch.Tensor:
    """Classes `(n,)` of the rows `(n, F)` of one group: equal rows, equal class. One stable sort per column."""
    n, F = rows.shape
    order = torch.arange(n, device=rows.device)
    for f in reversed(range(F)):
        order = order[torch.argsort(rows[order, f], stable=True)]
    ordered = rows[order]
    starts = torch.ones(n, dtype=torch.bool, device=rows.device)
    starts[1:] = (ordered[1:] != ordered[:-1]).any(dim=-1)
    return torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)


def key_classes(keys: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """Classes `(G, n)` int64 of the entries of each group of a chunk, numbered from 0 in each group: two entries
    share a class exactly when their keys (`(G, n, D)`) and values (`(G, n, E)`, if given) are equal.

    Keys are projected on a fixed random direction with `fixed_order_dot` in float64 (equal keys, equal
    projections) and sorted by projection; every entry that shares its projection is compared with the first entry
    of its class, and a group where two different entries share one gets its classes from the entries themselves
    (`_lexicographic_classes`).
    """
    G, n, D = keys.shape
    g = torch.Generator().manual_seed(17 + D)
    direction = (torch.rand(D, generator=g, dtype=torch.float64) + 1) * (torch.randint(0, 2, (D,), generator=g) * 2 - 1)
    projection = fixed_order_dot(keys, direction.to(keys.device))  # float64
    ordered, order = projection.sort(dim=-1)
    starts = torch.ones(G, n, dtype=torch.bool, device=keys.device)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    classes = torch.empty_like(order).scatter_(1, order, starts.cumsum(dim=-1) - 1)
    # Equal keys have equal projections; the converse is checked where a projection is shared (an entry whose
    # sorted successor starts no new class): each such entry against the first of its class.
    shared = ~starts
    shared[:, :-1] |= ~starts[:, 1:]
    if bool(shared.any()):
        position = torch.arange(n, device=keys.device).expand(G, n)
        first = order.gather(1, torch.where(starts, position, 0).cummax(dim=-1).values)  # in sorted order
        g, p = shared.nonzero(as_tuple=True)
        a, b = g * n + order[g, p], g * n + first[g, p]
        pairs = [(keys.reshape(G * n, D), a, b)]
        if values is not None and values is not keys:
            pairs.append((values.reshape(G * n, -1), a, b))
        equal = torch.ones(a.shape, dtype=torch.bool, device=keys.device)
        for rows, a, b in pairs:
            left, right = rows.index_select(0, a), rows.index_select(0, b)
            if not torch.equal(left, right):
                equal &= (left == right).all(dim=-1)
        for group in g[~equal].unique().tolist():  # two different entries share a projection
            rows = keys[group] if values is None or values is keys else torch.cat([keys[group], values[group]], -1)
            classes[group] = _lexicographic_classes(rows)
    return classes


class DistinctEntries(NamedTuple):
    """A chunk in which each distinct entry of a group counts once: keys `(G, U, D)`, values `(G, U, E)`, bias
    `(G, U)` (the key term of the logit), `counts` `(G, U)` how many entries each one stands for (None: one each),
    `lowest` `(G, U)` the lowest id among them, and `floor`, a logit below every real one. Entries that stand for
    none (count 0, id `NO_ID`; padding where groups have different numbers of distinct entries, or repeats left in
    place) have the bias `2 floor`, so that their logits lie below `floor`, their weights are exactly 0 and their
    `u` terms 0 (an infinite bias would make those NaN)."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor
    counts: torch.Tensor | None
    lowest: torch.Tensor
    floor: float


# a chunk is compacted to its distinct entries when they are at most this share of it (fewer columns in every GEMM);
# otherwise its repeats stay in place with weight 0 (no copy of the keys)
COMPACT_SHARE = 0.75


def distinct_entries(
    keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor
) -> DistinctEntries:
    """The distinct entries of a chunk: keys `(G, n, D)`, values `(G, n, E)`, key bias `(G, n)` (a function of the
    key; may be overwritten) and the entries' ids `(n,)`."""
    G, n, D = keys.shape
    device = keys.device
    ids = ids.to(device).expand(G, n)
    classes = key_classes(keys, values)
    floor = -torch.finfo(keys.dtype).max / 8
    distinct = classes.amax(dim=-1) + 1
    if bool((distinct == n).all()):  # every entry distinct
        return DistinctEntries(keys, values, bias, None, ids, floor)
    compact = int(distinct.amax()) <= COMPACT_SHARE * n
    width = int(distinct.amax()) if compact else n
    position = torch.arange(n, device=device).expand(G, n)
    first = torch.full((G, n), n, dtype=torch.int64, device=device).scatter_reduce_(1, classes, position, "amin")
    # the entry that stands for each class: class c itself when compacting, else the first entry of class c
    stands_for = classes if compact else first.gather(1, classes)
    counts = torch.zeros(G, width, dtype=keys.dtype, device=device).scatter_add_(1, stands_for, torch.ones_like(bias))
    lowest = torch.full((G, width), NO_ID, dtype=torch.int64, device=device)
    lowest.scatter_reduce_(1, stands_for, ids, "amin")
    unused = counts == 0
    if compact:
        first = first[:, :width].masked_fill(unused, 0)
        keys = keys.gather(1, first.unsqueeze(-1).expand(G, width, D)).masked_fill_(unused.unsqueeze(-1), 0)
        values = values.gather(1, first.unsqueeze(-1).expand(G, width, values.shape[-1]))
        values.masked_fill_(unused.unsqueeze(-1), 0)
        bias = bias.gather(1, first)
    bias.masked_fill_(unused, 2 * floor)
    return DistinctEntries(keys, values, bias, counts, lowest, floor)


def matmul_unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """The unit roundoff of the products a matrix multiplication of `dtype` runs with on `device`: the dtype's, or
    TF32's / bfloat16's where torch may use them for float32 (`allow_tf32`, `set_float32_matmul_precision`)."""
    if dtype != torch.float32:
        return torch.finfo(dtype).eps / 2
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return 2.0**-8
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return 2.0**-11 if tf32 or precision == "high" else torch.finfo(dtype).eps / 2


def peak_window(q: torch.Tensor, key_bound: float, bias_bound: float) -> torch.Tensor:
    """`(G, M)`: for queries `q` `(G, M, D)` against keys of entries at most `key_bound` in absolute value and key
    biases at most `bias_bound`, twice the largest difference between a GEMM logit (D + 1 terms in any order, each
    within gamma_(D+2) (sum_d |q_d k_d| + |bias|)) and its `fixed_order_dot` recomputation (within the same), with
    a factor 2 to spare: 8 gamma_(D+2) (|q|_1 key_bound + bias_bound)."""
    D = q.shape[-1]
    u = matmul_unit_roundoff(q.dtype, q.device)
    gamma = (D + 2) * u / (1 - (D + 2) * u)
    return q.abs().sum(dim=-1).mul_(key_bound).add_(bias_bound).mul_(8 * gamma)


def exact_peak(
    logits: torch.Tensor,
    q: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor,
    lowest: torch.Tensor,
    window: torch.Tensor,
    floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(m, best)` `(G, q)` of one tile of distinct entries: each query's largest logit computed in the fixed order
    of `fixed_order_dot`, and the lowest id among the entries that have it.

    `logits` `(G, q, n)`: the GEMM's logits of the queries `q` `(G, q, D)` against `keys` `(G, n, D)` with the key
    bias `bias` `(G, n)`; `lowest` `(G, n)` the entries' (lowest) ids; `window` `(G, q)` from `peak_window`;
    `floor` the logit below which entries are padding.

    The fixed-order maximum belongs to the GEMM's argmax or to an entry whose GEMM logit lies within `window` of
    the GEMM's maximum (each logit lies within `window` / 4 of its recomputation). So the argmax is recomputed, and
    where the GEMM's second largest logit lies within the window, so is every logit that close."""
    G, nq, n = logits.shape
    m_gemm, arg = logits.max(dim=-1)
    index = arg.unsqueeze(-1)
    m = fixed_order_dot(q, keys.gather(1, arg.unsqueeze(-1).expand(G, nq, keys.shape[-1]))) + bias.gather(1, arg)
    best = lowest.gather(1, arg)
    if n == 1:
        return m, best
    logits.scatter_(-1, index, -torch.inf)
    second = logits.amax(dim=-1)
    logits.scatter_(-1, index, m_gemm.unsqueeze(-1))
    threshold = m_gemm - window
    close = (second >= threshold) & (m_gemm > floor)
    if not bool(close.any()):
        return m, best
    g, i = close.nonzero(as_tuple=True)
    r, j = (logits[g, i] >= threshold[g, i].unsqueeze(-1)).nonzero(as_tuple=True)
    g, i = g[r], i[r]
    s = fixed_order_dot(q[g, i], keys[g, j]) + bias[g, j]
    row = g * nq + i
    top = m.flatten().scatter_reduce(0, row, s, "amax")
    best = torch.where(m.flatten() == top, best.flatten(), NO_ID)
    best.scatter_reduce_(0, row, torch.where(s == top[row], lowest[g, j], NO_ID), "amin")
    return top.view(G, nq), best.view(G, nq)
