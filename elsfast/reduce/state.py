"""The streaming log-sum-exp state of the softmax-weighted sum, as a monoid (neutral element, merge, finalize).

Logits are kept in base-2 units ("bits": s = logit / ln 2) so that backends can use exp2, which is ~3x cheaper
than exp on a CPU. For a set of entries j with logits s_j and values v_j a state represents

    m   = max_j s_j                              (G, M)   (exact: tiles use their exact max)
    l   = sum_j 2^(s_j - m)                      (G, M)
    acc = sum_j 2^(s_j - m) v_j                  (G, M, E)

and, when provenance is tracked,

    best = the id of the entry with the largest logit (the dominant dictionary entry)   (G, M) int64
           (among equal largest logits the lowest id, so that provenance does not depend on how the dictionary
           is split into chunks, kernel splits or the shards of ranks; the backends give identical patches equal
           logits wherever they are, the torch path through `elsfast.reduce.peaks`, whose m is then the dominant
           entry's logit computed in a fixed order, within rounding of the tile's largest)
    u    = sum_j 2^(s_j - m) (s_j - m)                                                   (G, M)

so that the dominant entry's weight is 1 / l and the posterior's entropy is ln l - ln 2 * u / l nats.
`merge_` combines two disjoint sets exactly, in any order and any grouping (so dictionary chunks of any sizes
give the same answer up to rounding; the stabiliser is per query, never shared across a batch). This is the fix
for the reference code's chunk-averaging defect (SPEC section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LOG2E", "ReduceState", "logit_scales", "lowest_id_of_max"]

LOG2E = 1.0 / math.log(2.0)


def logit_scales(abar: float) -> tuple[float, float]:
    """`(q_scale, key_scale)` = `(2a/T log2 e, a^2/T log2 e)` at noise level abar (a = sqrt(abar), T = 2 (1 - abar)):
    a query q's logit for key k is `q_scale q.k - key_scale |k|^2` bits (the `|q|^2` term cancels)."""
    a, T = math.sqrt(abar), 2.0 * (1.0 - abar)
    return 2.0 * a / T * LOG2E, a * a / T * LOG2E


def lowest_id_of_max(logits: torch.Tensor, m: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The lowest id among the entries whose logit equals the maximum `m`: `logits` `(G, M, n)`, `m` `(G, M)`,
    `ids` `(n,)` or `(G, M, n)` int64; returns `(G, M)` (-1 where every logit is -inf or NaN)."""
    ids = ids.expand(logits.shape)
    at_max = (logits == m.unsqueeze(-1)) & torch.isfinite(m).unsqueeze(-1)
    best = torch.where(at_max, ids, torch.iinfo(torch.int64).max).amin(dim=-1)
    return torch.where(at_max.any(dim=-1), best, -1)


@dataclass
class ReduceState:
    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor
    best: torch.Tensor | None = None
    u: torch.Tensor | None = None

    @classmethod
    def empty(
        cls, G: int, M: int, E: int, *, dtype: torch.dtype, device: torch.device, provenance: bool = False
    ) -> ReduceState:
        """The neutral element: no entries seen (m = -inf, l = 0, acc = 0; best = -1, u = 0)."""
        state = cls(
            torch.full((G, M), -torch.inf, dtype=dtype, device=device),
            torch.zeros(G, M, dtype=dtype, device=device),
            torch.zeros(G, M, E, dtype=dtype, device=device),
        )
        if provenance:
            state.best = torch.full((G, M), -1, dtype=torch.int64, device=device)
            state.u = torch.zeros(G, M, dtype=dtype, device=device)
        return state

    @classmethod
    def from_logits(cls, logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor | None = None) -> ReduceState:
        """State of one tile: `logits` `(G, M, n)` in bits (overwritten), `values` `(G, n, E)`.

        With `ids` `(n,)`, the ids of the tile's entries, the state also tracks provenance (`best`, `u`).
        """
        best = u = None
        if ids is None:
            m = logits.amax(dim=-1)
            weights = torch.exp2(logits.sub_(m.unsqueeze(-1)), out=logits)
        else:
            m, arg = logits.max(dim=-1)  # the first of equal maxima
            if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
                best = lowest_id_of_max(logits, m, ids)
            else:
                best = ids[arg]  # increasing ids: the first maximum has the lowest id
            shifted = logits.sub_(m.unsqueeze(-1))
            weights = torch.exp2(shifted)
            u = torch.einsum("gmn,gmn->gm", weights, shifted)  # batched dot: 2x faster than (w * s).sum(-1)
        l = weights.sum(dim=-1)
        G, _, E = values.shape
        if G == 1 and E <= 4:
            # A matrix-vector product per value channel is ~5x faster on a CPU than a GEMM with E <= 4 columns.
            acc = torch.stack([torch.mv(weights[0], values[0, :, e]) for e in range(E)], dim=-1).unsqueeze(0)
        else:
            acc = torch.bmm(weights, values)
        return cls(m, l, acc, best, u)

    @classmethod
    def from_query_logits(
        cls,
        logits: torch.Tensor,
        values: torch.Tensor,
        ids: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> ReduceState:
        """State of per-query entry sets (top-k): `logits` `(G, M, k)` in bits, `values` `(G, M, k, E)`, `ids`
        `(G, M, k)` the entries' ids (with it, provenance), `counts` `(G, M, k)` how many equal entries each one
        stands for (default 1). Entries with logit -inf count for nothing."""
        m = logits.amax(dim=-1)
        shifted = logits - m.unsqueeze(-1)
        weights = torch.exp2(shifted)
        if counts is not None:
            weights = weights * counts
        state = cls(m, weights.sum(dim=-1), torch.einsum("gmk,gmke->gme", weights, values))
        if ids is not None:
            state.best = lowest_id_of_max(logits, m, ids)
            state.u = torch.einsum("gmk,gmk->gm", weights, torch.where(weights > 0, shifted, 0.0))
        return state

    def assign_(self, g: int, rows: torch.Tensor, other: ReduceState) -> ReduceState:
        """Set queries `rows` of group `g` to the one-group state `other` (`(1, len(rows))`); returns self."""
        self.m[g, rows], self.l[g, rows], self.acc[g, rows] = other.m[0], other.l[0], other.acc[0]
        if self.best is not None:
            self.best[g, rows], self.u[g, rows] = other.best[0], other.u[0]
        return self

    def take(self, groups: slice | torch.Tensor = slice(None), rows: slice | torch.Tensor = slice(None)) -> ReduceState:
        """The state of groups `groups` and queries `rows` (a copy when they are index tensors)."""
        return ReduceState(*(None if t is None else t[groups][:, rows] for t in self._fields()))

    def rows(self, start: int, stop: int) -> ReduceState:
        """A view on queries `[start, stop)`; merging into it updates this state."""
        return self.take(rows=slice(start, stop))

    def merge_(self, other: ReduceState) -> ReduceState:
        """Fold `other` (disjoint entries, same queries) into this state in place; returns self."""
        m = torch.maximum(self.m, other.m)
        # 2^(-inf - -inf) is nan: a side with no entries yet (m = -inf) contributes with factor 0.
        finite = torch.isfinite(m)
        a = torch.where(finite, torch.exp2(self.m - m), 0.0)
        b = torch.where(finite, torch.exp2(other.m - m), 0.0)
        if self.best is not None:
            # u is relative to m: moving the reference from m_x to m adds (m_x - m) to every s_j - m_x
            shift_a = torch.where(self.l > 0, self.m - m, 0.0)
            shift_b = torch.where(other.l > 0, other.m - m, 0.0)
            self.u.copy_(a * (self.u + shift_a * self.l) + b * (other.u + shift_b * other.l))
            # the larger maximum's entry; on equal maxima the lower id (ids of both sides are >= 0 there: a side
            # with no entries has m = -inf, which equals the other side's only when neither has any)
            tie = torch.minimum(self.best, other.best)
            self.best.copy_(torch.where(other.m > self.m, other.best, torch.where(other.m == self.m, tie, self.best)))
        self.l.mul_(a).add_(other.l * b)
        self.acc.mul_(a.unsqueeze(-1)).add_(other.acc * b.unsqueeze(-1))
        self.m.copy_(m)
        return self

    def fold_(self) -> ReduceState:
        """For states stacked along a leading axis (e.g. the dictionary splits of a kernel: m `(K, G, M)`, acc
        `(K, G, M, E)`), merge all K into one, in log2(K) vectorised `merge_` steps that reuse this state's
        storage; returns the merged state without the leading axis."""
        lead = lambda index: ReduceState(*(None if t is None else t[index] for t in self._fields()))  # noqa: E731
        K = self.m.shape[0]
        while K > 1:
            half = K // 2
            lead(slice(0, half)).merge_(lead(slice(K - half, K)))
            K -= half
        return lead(0)

    def astype(self, dtype: torch.dtype) -> ReduceState:
        """This state with m, l, acc and u in `dtype` (best stays int64; tensors already in `dtype` are shared)."""
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return ReduceState(cast(self.m), cast(self.l), cast(self.acc), self.best, cast(self.u))

    def _fields(self) -> tuple[torch.Tensor | None, ...]:
        return self.m, self.l, self.acc, self.best, self.u

    def finalize(self) -> torch.Tensor:
        """The softmax-weighted mean of the values, `(G, M, E)`."""
        return self.acc / self.l.unsqueeze(-1)

    def top_weight(self) -> torch.Tensor:
        """Posterior weight of the dominant entry `best`, `(G, M)` (m is the exact maximum logit)."""
        return 1.0 / self.l

    def entropy(self) -> torch.Tensor:
        """Entropy of each query's posterior over the dictionary, in nats, `(G, M)`."""
        return torch.log(self.l) - math.log(2.0) * self.u / self.l
