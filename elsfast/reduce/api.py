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

from ..common.checks import (
    check_abar,
    check_channels_first,
    check_compute_tensor,
    check_finite_input,
    check_pixel_range,
    parse_memory_budget,
)
from . import policy, topk  # noqa: F401  (policy registers the exact backends it imports; topk registers itself)
from .budget import check_smallest_step
from .dictionary import Dictionary
from .registry import BackendOutput, BackendSpec, resolve_spec
from .state import ReduceState

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["DEFAULT_MEMORY_BUDGET", "Reduction", "softmax_reduce"]

DEFAULT_MEMORY_BUDGET = 512 << 20


@dataclass(frozen=True)
class Reduction:
    """Result of `softmax_reduce`.

    `values` `(G, M, E)`. `group_backends` `(G,)`: per group, the backend that ran (`"a+b"` when a group's queries
    ran on two, e.g. top-k and its exact fallback); `backend` names them all (`"a+b"` when they differ).
    `chunks`: dictionary chunks streamed. `pairs`: query-entry pairs actually scored (fewer than `exact_pairs`
    where a backend skipped work: distinct keys, top-k); `exact_pairs`: G * M * entries, the exact problem's.
    `neglected` `(G, M)`: for approximate backends (top-k), an upper bound on the posterior mass each query's
    result leaves out (0 where it ran exactly), and `approximate_queries` how many queries were answered
    approximately; None and 0 otherwise. With provenance: `best` `(G, M)` the id (`image * S + s`, see
    `Dictionary.entry_ids`) of each query's dominant entry, `weight` `(G, M)` its posterior weight and `entropy`
    `(G, M)` the posterior's entropy in nats; otherwise None. `log_normaliser` `(G, M)`: log2 of each query's
    softmax normaliser, `m + log2 l` in the bits of `elsfast.reduce.state` (of the entries scored), which the
    backward pass of `elsfast.reduce.grad` reuses."""

    values: torch.Tensor
    group_backends: tuple[str, ...]
    chunks: int
    pairs: int
    exact_pairs: int
    best: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    neglected: torch.Tensor | None = None
    approximate_queries: int = 0
    log_normaliser: torch.Tensor | None = None

    @property
    def backend(self) -> str:
        """The backends that ran, joined by "+" in order of first appearance (one name when all groups agree)."""
        names = dict.fromkeys(part for name in self.group_backends for part in name.split("+"))
        return "+".join(names)


def check_reduction(queries: torch.Tensor, dictionary: Dictionary) -> None:
    """The checks `softmax_reduce` makes of its queries and dictionary (see there); ValueError/TypeError naming the
    argument, before any backend runs."""
    check_compute_tensor(queries, "queries", "(G, M, D)")
    check_finite_input(queries, "queries")
    if not isinstance(dictionary, Dictionary):
        raise TypeError(
            f"dictionary must be an elsfast.reduce.Dictionary (ImageDictionary or PatchDictionary), got "
            f"{type(dictionary).__name__}; wrap training images as ImageDictionary(images)"
        )
    images = dictionary.images
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        what = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"the dictionary's images must be a torch tensor [N, C, H, W], got {what}")
    check_channels_first(images, "the dictionary's images")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"the dictionary's images must be uint8 or float, got {images.dtype}")
    check_pixel_range(images, "dictionary images", warn=False)
    G, _, D = queries.shape
    if dictionary.num_groups != G:
        raise ValueError(f"queries have {G} groups (G of (G, M, D)), the dictionary {dictionary.num_groups}")
    if dictionary.key_dim != D:
        raise ValueError(f"queries have {D} features (D of (G, M, D)), the dictionary's keys {dictionary.key_dim}")


def softmax_reduce(
    queries: torch.Tensor,
    dictionary: Dictionary,
    *,
    abar: float,
    backend: BackendSpec = "auto",
    memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
    provenance: bool = False,
    process_group: ProcessGroup | None = None,
) -> Reduction:
    """Softmax-weighted mean of the dictionary's values for each query. Queries that require grad (with grad
    enabled) give `values` that carry their exact gradient (`elsfast.reduce.grad`); an approximate backend then
    raises `NotDifferentiable`.

    Args:
        queries: `(G, M, D)` float32 or float64 (other dtypes, numpy arrays and other ranks are refused), finite
            and of magnitude at most `elsfast.common.checks.largest_input` (float32: 4.3e9); the computation runs
            in this dtype on its device.
        dictionary: the keys and values, built chunk by chunk (`elsfast.reduce.dictionary`): G groups of keys of
            D features, as the queries; its images uint8 or float in [-1, 1] (float images in [0, 255] refused).
        abar: noise level strictly between 0 and 1.
        backend: "auto" (the fastest *exact* backend for this problem: `elsfast.reduce.policy`), a registered
            backend name, or a configured backend (e.g. `TopK(k=128)`). Approximate backends run only when named.
        memory_budget: bytes of working memory (dictionary chunk, logit tile, state) the backend may use: a
            positive int or a string such as "512M". A chunk holds at least one training image's entries; a
            problem whose smallest step needs more than the budget (and more than `budget.MEMORY_FLOOR`) raises
            `budget.MemoryBudgetError` (a ValueError) naming the bytes.
        provenance: also return each query's dominant entry, its weight and the posterior entropy.
        process_group: the dictionary is sharded across the ranks of this torch.distributed group (pass the
            default group as `torch.distributed.group.WORLD`): every rank calls with the same queries and its own
            shard, and every rank gets the result over the whole dictionary. Entry ids must be global
            (`Dictionary.image_ids`).
    """
    check_reduction(queries, dictionary)
    abar = check_abar(abar)
    memory_budget = parse_memory_budget(memory_budget)
    if not isinstance(provenance, bool):
        raise TypeError(f"provenance must be True or False, got {provenance!r}")
    named = resolve_spec(backend)  # the one check of the spec; None: auto
    if queries.requires_grad and torch.is_grad_enabled():  # exact gradients or a clear refusal, never detached
        from .grad import differentiable_reduce

        return differentiable_reduce(
            queries,
            dictionary,
            abar=abar,
            backend=backend,
            memory_budget=memory_budget,
            provenance=provenance,
            process_group=process_group,
        )
    if process_group is not None and named is not None and not named.EXACT:
        raise ValueError(f"backend {named.NAME!r} is approximate and cannot merge the shards of a sharded dictionary")
    G, M, _ = queries.shape
    exact_pairs = G * M * dictionary.size
    if G * M == 0 or dictionary.size == 0:  # nothing to reduce (no entries: every result is 0/0, as when folded)
        E, dtype = dictionary.value_dim, queries.dtype
        state = ReduceState.empty(G, M, E, dtype=dtype, device=queries.device, provenance=provenance)
        out = BackendOutput(state, 0, backends=(named.NAME if named is not None else "none",) * G, pairs=0)
    else:
        check_smallest_step(dictionary, G * M, queries.element_size(), memory_budget)
        ran, out = policy.run(named, queries, dictionary, abar=abar, memory_budget=memory_budget, provenance=provenance)
        if out.backends is None:
            out = out._replace(backends=(ran.NAME,) * G)
    state = out.state
    if process_group is not None:
        from .distributed import all_merge_

        all_merge_(state, process_group)
    result = Reduction(
        state.finalize(),
        out.backends,
        out.chunks,
        exact_pairs if out.pairs is None else out.pairs,
        exact_pairs,
        neglected=out.neglected,
        approximate_queries=out.approximate_queries,
        log_normaliser=state.m + torch.log2(state.l),
    )
    if provenance:
        return replace(result, best=state.best, weight=state.top_weight(), entropy=state.entropy())
    return result
