"""Portable torch backend: streaming log-sum-exp over dictionary chunks, on any device torch supports.

Per dictionary chunk (built from `images_per_chunk` training images), per query tile and key tile:

    s = (2a/T) q.k - (a^2/T) |k|^2            (bits: both scales carry a factor log2(e))
    state <- merge(state, tile_state(s, v))    (ReduceState: running max, sum and weighted value sum)

The tiles are computed in the query dtype; in float32 the running state is float64 and each tile's sums are
torch sums (blockwise pairwise), not matrix-vector products, so the result's error is that of the fp32 logits
plus a few fp32 roundings, whatever the memory budget (docs/performance.md, "accuracy of the torch path";
tests/test_torch_accuracy.py).

With provenance, each chunk is reduced over its distinct keys, and each tile's dominant logit is recomputed in an
order fixed by D alone (`elsfast.reduce.peaks`), so that identical patches tie exactly wherever the chunks, tiles
and shards put them, and the lowest id wins.

The -|q|^2/T term of -||q - a k||^2 / T is constant per query and cancels in the softmax (SPEC section 5).
The logit tile is a `baddbmm` that adds the key-norm bias in the same call, exp2 is ~3x cheaper than exp on a
CPU, and the tile stays small (`TILE_BYTES`) so it lives in cache between the GEMM, the exp and the value sum.
Its throughput is measured in docs/performance.md (benchmarks/bench_machines.py, bench_cpu.py).
"""

from __future__ import annotations

import torch

from .dictionary import Dictionary
from .peaks import distinct_entries, exact_peak, fixed_order_dot, peak_window
from .registry import Backend, BackendOutput, Tolerance, register_backend
from .state import ReduceState, logit_scales, lowest_id_of_max

__all__ = ["TorchBackend"]

TILE_BYTES = 8 << 20
MIN_TILE = 1 << 14  # elements: smaller tiles cost more in Python overhead than they save in memory
QUERY_TILE = 1024
SUM_CHANNELS = 4  # values of at most this many channels are summed per channel (see `tile_state`)


def _state_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The running state's dtype: float64 (MPS has none: there the query dtype)."""
    return dtype if device.type == "mps" else torch.float64


def plan_chunks(queries: torch.Tensor, dictionary: Dictionary, memory_budget: int) -> tuple[int, int, int]:
    """Sizes for a memory budget in bytes: (training images per dictionary chunk, query tile, key tile).

    The budget covers the logit tile (two tiles of half the size for 2 to `SUM_CHANNELS` value channels), the
    running state, the queries and one dictionary chunk. A chunk holds at least one image and the tiles at least
    `MIN_TILE` elements, so a budget below that is exceeded by at most one image's patches and `MIN_TILE`.
    """
    G, M, D = queries.shape
    E = dictionary.value_dim
    itemsize = queries.element_size()
    state_itemsize = torch.empty(0, dtype=_state_dtype(queries.dtype, queries.device)).element_size()
    tiles = 2 if 1 < E <= SUM_CHANNELS else 1
    tile_elems = max(MIN_TILE, min(TILE_BYTES, memory_budget // 4) // itemsize) // tiles
    query_tile = max(1, min(M, QUERY_TILE, tile_elems // G))
    key_tile = max(1, tile_elems // (G * query_tile))
    fixed = itemsize * (tiles * tile_elems + G * M * D) + state_itemsize * G * M * (E + 2)
    images = (memory_budget - fixed) // dictionary.bytes_per_image(itemsize)
    return max(1, min(dictionary.num_images, images)), query_tile, key_tile


def tile_state(
    logits: torch.Tensor,
    values_t: torch.Tensor,
    values: torch.Tensor,
    scratch: torch.Tensor | None,
    ids: torch.Tensor | None = None,
    peak: tuple[torch.Tensor, torch.Tensor] | None = None,
    counts: torch.Tensor | None = None,
) -> ReduceState:
    """State of one tile, like `ReduceState.from_logits`, with every sum over the tile's entries a torch sum
    (blockwise and pairwise, error ~ eps log n): `logits` `(G, q, n)` in bits (overwritten), `values_t`
    `(G, E, n)` and `values` `(G, n, E)` the same values, `scratch` a spare buffer of the tile's size for
    1 < E <= `SUM_CHANNELS` without provenance. Provenance: `peak` = `(m, best)` (`peaks.exact_peak`), or `ids`
    `(n,)` the entries' ids (then m is the tile's maximum and best the lowest id that reaches it). `counts`
    `(G, n)`: how many entries each one stands for (`peaks.distinct_entries`), None for one each.

    A matrix product of the weights with E <= 4 value columns (`mv`/`bmm`) accumulates the tile's entries one
    after another in fp32: a query with one dominant entry (weight 1) then loses every weight below half an ulp
    of 1, 5.5e-5 of the value over a 1,170-entry MNIST tile (measured); one multiply and one sum per channel
    cost no more than the `mv` and lose ~1e-7. More channels (IS/ES: whole images) keep the `bmm`.
    """
    best = u = None
    if ids is None and peak is None:
        m = logits.amax(dim=-1)
        weights = torch.exp2(logits.sub_(m.unsqueeze(-1)), out=logits)
        if counts is not None:
            weights.mul_(counts.unsqueeze(1))
    else:
        if peak is None:
            m = logits.amax(dim=-1)
            best = lowest_id_of_max(logits, m, ids)
        else:
            m, best = peak
        shifted = logits.sub_(m.unsqueeze(-1))
        weights = torch.exp2(shifted)
        if counts is not None:
            weights.mul_(counts.unsqueeze(1))
        u = torch.mul(weights, shifted, out=shifted).sum(dim=-1)
        scratch = shifted  # free again
    l = weights.sum(dim=-1)
    E = values_t.shape[1]
    if E > SUM_CHANNELS:
        return ReduceState(m, l, torch.bmm(weights, values), best, u)
    sums = []
    for e in range(E):
        # the last channel may overwrite the weights; the others go through the scratch tile
        out = weights if e == E - 1 and best is None else scratch[: weights.numel()].view_as(weights)
        sums.append(torch.mul(weights, values_t[:, e : e + 1], out=out).sum(dim=-1))
    acc = sums[0].unsqueeze(-1) if E == 1 else torch.stack(sums, dim=-1)
    return ReduceState(m, l, acc, best, u)


def merge_tile_(state: ReduceState, tile: ReduceState) -> None:
    """`state.merge_(tile)` for a tile without provenance whose maxima are finite (a tile's logits always are):
    no masks for empty sides (an empty state's m = -inf gives it the factor exp2(-inf) = 0): 10 operations
    instead of 15, which matters when small budgets make the tiles small."""
    m = torch.maximum(state.m, tile.m)
    a, b = torch.exp2(state.m - m), torch.exp2(tile.m - m)
    state.l.mul_(a).addcmul_(tile.l, b)
    state.acc.mul_(a.unsqueeze(-1)).addcmul_(tile.acc, b.unsqueeze(-1))
    state.m.copy_(m)


@register_backend
class TorchBackend(Backend):
    """The portable path (any device, float32 and float64)."""

    NAME = "torch"

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """float32: fp32 logits (a logit is off by about 2 eps32 L, an output by twice that) with float64 running
        sums, so the bound does not depend on the budget: `4 eps32 L + 1e-6` (measured at most 0.16 eps32 L +
        3e-7 over tests/test_torch_accuracy.py's grid). float64: as the other backends."""
        if dtype == torch.float32:
            return Tolerance(4.0, 1e-6)
        return super().accuracy(dtype)

    def reduce(
        self,
        queries: torch.Tensor,
        dictionary: Dictionary,
        *,
        abar: float,
        memory_budget: int,
        provenance: bool = False,
    ) -> BackendOutput:
        G, M, _ = queries.shape
        dtype, device = queries.dtype, queries.device
        q_scale, key_scale = logit_scales(abar)
        q = queries * q_scale
        images_per_chunk, query_tile, key_tile = plan_chunks(queries, dictionary, memory_budget)
        E = dictionary.value_dim
        # fp32 tiles, fp64 running state: thousands of fp32 merges per query lost up to 2e-4 on MNIST (1 MiB)
        state = ReduceState.empty(G, M, E, dtype=_state_dtype(dtype, device), device=device, provenance=provenance)
        # one logit buffer for all tiles: a fresh 8 MB tensor per tile costs page faults on every allocation
        buffer = torch.empty(G * query_tile * key_tile, dtype=dtype, device=device)
        scratch = torch.empty_like(buffer) if 1 < E <= SUM_CHANNELS and not provenance else None
        chunks = 0
        for start in range(0, dictionary.num_images, images_per_chunk):
            keys, values = dictionary.entries(start, start + images_per_chunk, dtype)
            keys, values = keys.to(device), values.to(device)
            bias = fixed_order_dot(keys, keys).mul_(-key_scale)  # (G, n): a function of each key alone
            counts = None
            if provenance:
                key_bound = max(keys.amax().item(), -keys.amin().item())
                bias_bound = max(bias.amax().item(), -bias.amin().item())
                ids = dictionary.entry_ids(start, start + images_per_chunk)
                keys, values, bias, counts, lowest, floor = distinct_entries(keys, values, bias, ids)
            # (G, E, n): one row per channel for the per-channel sums (`tile_state`)
            values_t = values.transpose(1, 2).contiguous() if E <= SUM_CHANNELS else values.transpose(1, 2)
            keys_t = keys.transpose(1, 2)  # (G, D, n)
            n = keys.shape[1]
            for q0 in range(0, M, query_tile):
                rows = state.rows(q0, q0 + query_tile)
                q_tile = q[:, q0 : q0 + query_tile]
                if provenance:
                    window = peak_window(q_tile, key_bound, bias_bound)
                for k0 in range(0, n, key_tile):
                    k1 = k0 + key_tile
                    k_tile = keys_t[:, :, k0:k1]
                    logits = buffer[: G * q_tile.shape[1] * k_tile.shape[2]].view(G, q_tile.shape[1], -1)
                    torch.baddbmm(bias[:, None, k0:k1], q_tile, k_tile, out=logits)
                    peak = None
                    if provenance:
                        tile_keys, tile_bias, tile_lowest = keys[:, k0:k1], bias[:, k0:k1], lowest[:, k0:k1]
                        peak = exact_peak(logits, q_tile, tile_keys, tile_bias, tile_lowest, window, floor)
                    tile_counts = None if counts is None else counts[:, k0:k1]
                    tile = tile_state(logits, values_t[:, :, k0:k1], values[:, k0:k1], scratch, None, peak, tile_counts)
                    if provenance:
                        rows.merge_(tile)
                    else:
                        merge_tile_(rows, tile)
            chunks += 1
        return BackendOutput(state.astype(dtype), chunks)
