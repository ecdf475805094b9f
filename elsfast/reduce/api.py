"""`softmax_reduce`: the one core operation behind every machine (SPEC section 5).

Shape letters, used in every docstring of `elsfast.reduce`:

    G  groups: independent softmaxes over separate dictionaries (LS: one per pixel; ELS with zero padding:
       one per border class; ELS circular, IS, ES: one)
    M  queries per group (noisy patches or images)
    N  training images in the dictionary; each contributes S entries to every group (N * S entries a group)
    D  key dimension: C*P*P for patches, C*H*W for whole images
    E  value dimension: C for a patch's centre pixel, C*H*W for whole images

For queries q `(G, M, D)` and noise level abar, with a = sqrt(abar) and T = 2 (1 - abar):

    out[g, m] = sum_j softmax_j( -||q[g, m] - a k[g, j]||^2 / T ) v[g, j]

over the entries j of group g of the dictionary. Machines, the sampler and adapters call only this function;
which backend runs it is chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from . import cpu_backend, cuda_backend, dedup_backend, shift_backend, topk, torch_backend, triton_backend  # noqa: F401  (register the backends)
from .dictionary import Dictionary
from .registry import BackendOutput, BackendSpec, select_backend
from .state import ReduceState

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["DEFAULT_MEMORY_BUDGET", "Reduction", "softmax_reduce"]

DEFAULT_MEMORY_BUDGET = 512 << 20


@dataclass(frozen=True)
class Reduction:
    """Result of `softmax_reduce`: `values` `(G, M, E)`, the backend that ran, how many dictionary chunks it
    streamed, and the number of query-entry pairs of the exact problem. `neglected` `(G, M)`: for approximate
    backends (top-k), an upper bound on the posterior mass each query's result leaves out (0 where it ran
    exactly), and `approximate_queries` how many queries were answered approximately; None and 0 otherwise.
    With provenance: `best` `(G, M)` the id (`image * S + s`, see `Dictionary.entry_ids`) of each query's
    dominant entry, `weight` `(G, M)` its posterior weight and `entropy` `(G, M)` the posterior's entropy in
    nats; otherwise None."""

    values: torch.Tensor
    backend: str
    chunks: int
    pairs: int
    best: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    neglected: torch.Tensor | None = None
    approximate_queries: int = 0


def softmax_reduce(
    queries: torch.Tensor,
    dictionary: Dictionary,
    *,
    abar: float,
    backend: BackendSpec = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    provenance: bool = False,
    process_group: ProcessGroup | None = None,
) -> Reduction:
    """Softmax-weighted mean of the dictionary's values for each query.

    Args:
        queries: `(G, M, D)` float32 or float64; the computation runs in this dtype on its device.
        dictionary: the keys and values, built chunk by chunk (`elsfast.reduce.dictionary`).
        abar: noise level in (0, 1).
        backend: a registered backend name, "auto", or a configured backend (e.g. `TopK(k=128)`).
        memory_budget: bytes of working memory (dictionary chunk, logit tile, state) the backend may use.
        provenance: also return each query's dominant entry, its weight and the posterior entropy.
        process_group: the dictionary is sharded across the ranks of this torch.distributed group (pass the
            default group as `torch.distributed.group.WORLD`): every rank calls with the same queries and its own
            shard, and every rank gets the result over the whole dictionary. Entry ids must be global
            (`Dictionary.image_ids`).
    """
    # a sharded dictionary merges exact partial states: `auto` then considers exact backends only
    chosen = select_backend(backend, queries, dictionary, exact_only=process_group is not None)
    if process_group is not None and not chosen.EXACT:
        raise ValueError(f"backend {chosen.NAME!r} is approximate and cannot merge the shards of a sharded dictionary")
    G, M, _ = queries.shape
    if G * M == 0 or dictionary.size == 0:  # nothing to reduce (no entries: every result is 0/0, as when folded)
        E, dtype = dictionary.value_dim, queries.dtype
        out = BackendOutput(ReduceState.empty(G, M, E, dtype=dtype, device=queries.device, provenance=provenance), 0)
    else:
        out = chosen.reduce(queries, dictionary, abar=abar, memory_budget=memory_budget, provenance=provenance)
    state = out.state
    if process_group is not None:
        from .distributed import all_merge_

        all_merge_(state, process_group)
    result = Reduction(
        state.finalize(),
        chosen.NAME,
        out.chunks,
        G * M * dictionary.size,
        neglected=out.neglected,
        approximate_queries=out.approximate_queries,
    )
    if provenance:
        return replace(result, best=state.best, weight=state.top_weight(), entropy=state.entropy())
    return result
