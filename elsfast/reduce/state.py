"""The streaming log-sum-exp state of the softmax-weighted sum, as a monoid (neutral element, merge, finalize).

Logits are kept in base-2 units ("bits": s = logit / ln 2) so that backends can use exp2, which is ~3x cheaper
than exp on a CPU. For a set of entries j with logits s_j and values v_j a state represents

    m   = an upper bound on max_j s_j            (G, M)
    l   = sum_j 2^(s_j - m)                      (G, M)
    acc = sum_j 2^(s_j - m) v_j                  (G, M, E)

and `merge_` combines two disjoint sets exactly, in any order and any grouping (so dictionary chunks of any
sizes give the same answer up to rounding; the stabiliser is per query, never shared across a batch). This is
the fix for the reference code's chunk-averaging defect (SPEC section 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ReduceState"]


@dataclass
class ReduceState:
    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor

    @classmethod
    def empty(cls, G: int, M: int, E: int, *, dtype: torch.dtype, device: torch.device) -> ReduceState:
        """The neutral element: no entries seen (m = -inf, l = 0, acc = 0)."""
        return cls(
            torch.full((G, M), -torch.inf, dtype=dtype, device=device),
            torch.zeros(G, M, dtype=dtype, device=device),
            torch.zeros(G, M, E, dtype=dtype, device=device),
        )

    @classmethod
    def from_logits(cls, logits: torch.Tensor, values: torch.Tensor) -> ReduceState:
        """State of one tile: `logits` `(G, M, n)` in bits (overwritten with the weights), `values` `(G, n, E)`."""
        m = logits.amax(dim=-1)
        weights = torch.exp2(logits.sub_(m.unsqueeze(-1)), out=logits)
        l = weights.sum(dim=-1)
        G, _, E = values.shape
        if G == 1 and E <= 4:
            # A matrix-vector product per value channel is ~5x faster on a CPU than a GEMM with E <= 4 columns.
            acc = torch.stack([torch.mv(weights[0], values[0, :, e]) for e in range(E)], dim=-1).unsqueeze(0)
        else:
            acc = torch.bmm(weights, values)
        return cls(m, l, acc)

    def rows(self, start: int, stop: int) -> ReduceState:
        """A view on queries `[start, stop)`; merging into it updates this state."""
        return ReduceState(self.m[:, start:stop], self.l[:, start:stop], self.acc[:, start:stop])

    def merge_(self, other: ReduceState) -> ReduceState:
        """Fold `other` (disjoint entries, same queries) into this state in place; returns self."""
        m = torch.maximum(self.m, other.m)
        # 2^(-inf - -inf) is nan: a side with no entries yet (m = -inf) contributes with factor 0.
        finite = torch.isfinite(m)
        a = torch.where(finite, torch.exp2(self.m - m), 0.0)
        b = torch.where(finite, torch.exp2(other.m - m), 0.0)
        self.l.mul_(a).add_(other.l * b)
        self.acc.mul_(a.unsqueeze(-1)).add_(other.acc * b.unsqueeze(-1))
        self.m.copy_(m)
        return self

    def finalize(self) -> torch.Tensor:
        """The softmax-weighted mean of the values, `(G, M, E)`."""
        return self.acc / self.l.unsqueeze(-1)
