"""Working memory: what one step of a reduction needs at the least, checked against `memory_budget` up front.

Backends size their chunks from `memory_budget` (`elsfast.reduce.torch_backend.plan_chunks`, ...), but a chunk
holds at least one training image's entries, and the caller's queries are given. A budget is therefore a
target that small budgets undercut (`memory_budget=1` means "one image a chunk"), up to `MEMORY_FLOOR`: a problem
whose smallest step needs more than `max(memory_budget, MEMORY_FLOOR)` is refused before anything is allocated,
with a `MemoryBudgetError` naming the bytes it would need (SPEC section 5; docs/guide.md, "Memory").
"""

from __future__ import annotations

from ..common.memory import format_bytes
from .dictionary import Dictionary

__all__ = [
    "MEMORY_FLOOR",
    "MemoryBudgetError",
    "allowed_bytes",
    "check_smallest_step",
    "query_slices",
    "smallest_step_bytes",
]

MEMORY_FLOOR = 64 << 20
"""Working memory always allowed (bytes): a smaller `memory_budget` still sizes the chunks, but refuses nothing
whose smallest step fits in this."""


class MemoryBudgetError(ValueError):
    """A problem whose smallest step needs more working memory than `memory_budget` allows (`allowed_bytes`)."""


def allowed_bytes(memory_budget: int) -> int:
    """The most working memory one step may take under `memory_budget`: the budget, but at least `MEMORY_FLOOR`."""
    return max(int(memory_budget), MEMORY_FLOOR)


def smallest_step_bytes(dictionary: Dictionary, queries: int, itemsize: int) -> int:
    """Bytes the smallest step of a reduction over `dictionary` allocates for `queries` (G * M) queries, whatever
    the backend: one training image's entries (`Dictionary.bytes_per_image`) and the running state (float64). The
    fused kernels' index tables (`Dictionary.pixel_offsets`) take about as much again; they are not counted, so
    that nothing a backend can run is refused."""
    state = 8 * queries * (dictionary.value_dim + 3)
    return dictionary.bytes_per_image(itemsize) + state


def check_smallest_step(dictionary: Dictionary, queries: int, itemsize: int, memory_budget: int) -> None:
    """MemoryBudgetError when the smallest step (`smallest_step_bytes`) exceeds `allowed_bytes(memory_budget)`."""
    need = smallest_step_bytes(dictionary, queries, itemsize)
    if need > allowed_bytes(memory_budget):
        G, S, D = dictionary.num_groups, dictionary.entries_per_image, dictionary.key_dim
        raise MemoryBudgetError(
            f"this reduction needs at least {format_bytes(need)} of working memory (one training image gives "
            f"{G} x {S} entries of {D} features, and {queries} queries keep a running state), more than "
            f"memory_budget allows ({format_bytes(allowed_bytes(memory_budget))}); raise memory_budget, or use a "
            "smaller patch size, smaller images or fewer queries"
        )


def query_slices(count: int, bytes_per_item: int, memory_budget: int) -> list[slice]:
    """Consecutive slices of a batch of `count` items whose queries (`bytes_per_item` each, twice: the patches
    and the copy made while extracting them) take at most half of `allowed_bytes(memory_budget)`; the whole batch
    in one slice when it fits. MemoryBudgetError naming the bytes when a single item does not fit."""
    half = allowed_bytes(memory_budget) // 2
    if 2 * bytes_per_item > half:
        raise MemoryBudgetError(
            f"the queries of a single sample take {format_bytes(2 * bytes_per_item)} while they are built, more "
            f"than half the working memory memory_budget allows ({format_bytes(allowed_bytes(memory_budget))}); "
            "raise memory_budget, or use a smaller patch size or smaller images"
        )
    step = max(1, half // (2 * bytes_per_item))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]
