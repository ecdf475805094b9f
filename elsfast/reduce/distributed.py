"""Exact merge of per-rank partial states with torch.distributed collectives (gloo on CPU, NCCL on GPU).

Each rank reduces its own shard of the dictionary to a `ReduceState` over the same queries; `all_merge_` turns
every rank's state into the state of the whole dictionary: an all-reduce MAX of the running maxima, a rescale
of each rank's sums to the common maximum, and an all-reduce SUM. The dominant entry is the one of the rank
holding the global maximum; where several ranks hold it (equal logits, e.g. repeated patches) the lowest global
id wins (an all-reduce MIN), the rule `ReduceState.merge_` applies to chunks and kernel splits; identical patches
have equal logits on every rank (`elsfast.reduce.peaks`), so a sharded run names the same sources as one process.
Every collective waits at most `elsfast.reduce.collectives.collective_timeout()` seconds.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import timed
from .state import ReduceState

__all__ = ["all_merge_"]


def all_merge_(state: ReduceState, group: dist.ProcessGroup | None = None) -> ReduceState:
    """In place: every rank's `state` becomes the merge of all ranks' states; returns it. Collective."""
    m = state.m.clone()
    timed("the merge of the ranks' maxima (all_reduce MAX)", dist.all_reduce, m, op=dist.ReduceOp.MAX, group=group)
    seen = state.l > 0  # a rank whose shard had no entries for a query has m = -inf there
    scale = torch.where(seen, torch.exp2(state.m - m), 0.0)
    if state.best is not None:
        shift = torch.where(seen, state.m - m, 0.0)
        state.u.copy_(scale * (state.u + shift * state.l))
        none = torch.iinfo(torch.int64).max
        best = torch.where(seen & (state.m == m), state.best, none)
        timed(
            "the merge of the dominant entries (all_reduce MIN)",
            dist.all_reduce,
            best,
            op=dist.ReduceOp.MIN,
            group=group,
        )
        state.best.copy_(torch.where(best == none, -1, best))  # -1: no rank had entries for that query
        timed("the merge of the entropies (all_reduce)", dist.all_reduce, state.u, group=group)
    state.l.mul_(scale)
    state.acc.mul_(scale.unsqueeze(-1))
    timed("the merge of the softmax sums (all_reduce)", dist.all_reduce, state.l, group=group)
    timed("the merge of the weighted values (all_reduce)", dist.all_reduce, state.acc, group=group)
    state.m.copy_(m)
    return state
