"""Dedup backend: the exact softmax over each group's *distinct* entries, every distinct key weighted by how often
it occurs, on the `cpu` kernel (csrc/cpu_kernel.inc with a per-key logit bias of log2(count) bits).

Equal keys have equal logits and equal values (a patch's value is its own centre pixel), so summing each distinct
key once with weight `count` gives the same softmax as summing every entry: the result is exact, not approximate,
and costs `distinct / total` of the `cpu` kernel's pairs. Flat backgrounds repeat one patch millions of times
(MNIST); natural RGB images barely repeat a patch (the measured figures and `auto`'s rule are in
`elsfast.reduce.policy`).

The distinct keys of a group are found once (hash, then verified exactly: `elsfast.reduce.distinct`) inside
`reduce`, and kept in a byte-bounded in-memory cache (`TABLES`, `CACHE_BYTES`) named by the content hash of the
training images and the group's positions, so the steps of a sample that share a patch size share them; each
table is tagged with that content hash (`elsfast.clear_caches`, `ScoreMachine.clear_cache`). With
`min_duplication`, a group whose keys repeat less than that runs on the `cpu` kernel instead, its table is dropped
and only its counts are remembered (`COUNTS`), so it is never built again. Memory: the table is `distinct x
features` bytes for uint8 images (1.1 GB for MNIST at P = 7), its build holds every entry's key once
(`entries x features` bytes, 2.9 GB there). With provenance the backend runs the `cpu` kernel, whose dominant
entry is an entry of the training set rather than a distinct key (the report then names `cpu`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..common.threads import kernel_threads
from . import cpu_ext
from .caches import MemoryCache, content_hash
from .dictionary import Dictionary, PatchDictionary
from .distinct import describe, distinct_entries
from .partials import KernelInputs, fold_partial_states
from .registry import Backend, BackendOutput, Tolerance, register_backend
from .state import ReduceState, logit_scales

__all__ = ["CACHE_BYTES", "COUNTS", "TABLES", "Dedup", "DistinctTable", "distinct_table"]

log = logging.getLogger("elsfast")

CACHE_BYTES = 4 << 30


@dataclass(frozen=True)
class DistinctTable:
    """The distinct keys of one group as the `cpu` kernel reads them: `keys` `(U, Dv)` (uint8 pixel values, or
    float32) over the features `features` `(Dv,)` that vary between entries (the others are zero padding, equal
    in every entry), `value_features` `(E,)` int32 the column of each channel's centre pixel, `bias` `(U,)` fp32
    log2 of each key's count, and `total` the entries they stand for."""

    keys: torch.Tensor
    features: torch.Tensor
    value_features: torch.Tensor
    bias: torch.Tensor
    total: int

    @property
    def duplication(self) -> float:
        """Entries per distinct key."""
        return self.total / max(1, self.keys.shape[0])

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + 4 * self.keys.shape[0]


TABLES = MemoryCache("dedup tables", CACHE_BYTES, lambda table: table.nbytes)
# (entries, distinct keys) of every table built, kept when the table is dropped: 64 bytes an entry, 1 MiB in all
COUNTS = MemoryCache("dedup counts", 1 << 20, lambda counts: 64)


def _table_key(dg: Dictionary) -> str:
    digest = hashlib.sha256(content_hash(dg.images).encode())
    digest.update(describe(dg))
    return digest.hexdigest()


def distinct_table(dg: PatchDictionary, *, memory_budget: int) -> DistinctTable:
    """The distinct keys of the one-group patch dictionary `dg`, from the cache or built (and cached)."""
    key = _table_key(dg)
    hit = TABLES.get(key)
    if hit is not None:
        return hit
    started = time.perf_counter()
    entries = distinct_entries(dg, "auto", memory_budget=memory_budget)
    key_offsets, value_offsets = (t[0, 0] for t in dg.pixel_offsets())  # one position: where the centre sits
    centre = [int((key_offsets == offset).nonzero()[0]) for offset in value_offsets.tolist()]
    value_features = torch.tensor([int((entries.features == c).nonzero()[0]) for c in centre], dtype=torch.int32)
    table = DistinctTable(
        entries.keys.contiguous(),
        entries.features,
        value_features,
        entries.counts.log2().float(),
        entries.total,
    )
    log.info(
        "dedup: %d entries -> %d distinct keys (%.2fx) in %.1f s",
        table.total,
        table.keys.shape[0],
        table.duplication,
        time.perf_counter() - started,
    )
    tags = [content_hash(dg.images)]
    TABLES.put(key, table, tags=tags)
    COUNTS.put(key, (table.total, table.keys.shape[0]), tags=tags)
    return table


@register_backend
@dataclass(frozen=True)
class Dedup(Backend):
    """The `cpu` kernel over each group's distinct entries with log-count biases, for patch dictionaries on CPU
    tensors (exact). Options as `Cpu`, and:

    Args:
        splits: partial states per query; None: enough work units for two per thread.
        tiles_per_chunk: key tiles of 256 distinct keys packed at once; None: about 2 MB.
        isa: "auto" (AVX-512 over AVX2), "avx2" or "avx512".
        min_duplication: groups whose entries per distinct key fall below this run on the `cpu` kernel (the
            report names it); None: every group runs deduplicated.
    """

    splits: int | None = None
    tiles_per_chunk: int | None = None
    isa: str = "auto"
    min_duplication: float | None = None

    NAME = "dedup"
    LIMITS: ClassVar[dict[str, str]] = {
        **cpu_ext.CPU_KERNEL_LIMITS,
        "patches": "needs a patch dictionary (IS/ES run on torch)",
    }

    def __post_init__(self) -> None:
        cpu_ext.check_options(self, ("splits", "tiles_per_chunk"))
        if self.min_duplication is not None and not self.min_duplication >= 1.0:
            raise ValueError(f"min_duplication must be at least 1 or None, got {self.min_duplication!r}")

    def options(self) -> dict:
        names = ("splits", "tiles_per_chunk", "isa", "min_duplication")
        return {name: getattr(self, name) for name in names}

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        reasons = cpu_ext.unsupported_reasons(self, queries, dictionary)
        if not isinstance(dictionary, PatchDictionary):
            reasons.append(self.refuse("patches", type(dictionary).__name__))
        return reasons

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """The cpu kernel's: a count's log2 bias adds one fp32 rounding of a few bits to a logit, within its bound."""
        return cpu_ext.accuracy() if dtype == torch.float32 else super().accuracy(dtype)

    def _cpu_kernel(
        self, queries: torch.Tensor, dictionary: Dictionary, abar: float, memory_budget: int, provenance: bool
    ) -> BackendOutput:
        """Every entry on the `cpu` kernel (the report names `cpu`): provenance, or groups that repeat too little."""
        state, chunks = cpu_ext.reduce_dictionary(
            queries, dictionary, abar=abar, memory_budget=memory_budget, provenance=provenance,
            threads=kernel_threads(), isa=self.isa, splits=self.splits, tiles_per_chunk=self.tiles_per_chunk,
        )  # fmt: skip
        return BackendOutput(state, chunks, backends=("cpu",) * queries.shape[0])

    def _table_or_none(self, dg: PatchDictionary, memory_budget: int) -> DistinctTable | None:
        """The group's table, or None where `min_duplication` sends the group to the cpu kernel (a table that
        repeats too little is dropped as soon as it is built; its counts are remembered)."""
        key = _table_key(dg)
        counts = COUNTS.get(key)
        if self.min_duplication is not None and counts is not None and counts[0] < self.min_duplication * counts[1]:
            return None
        table = distinct_table(dg, memory_budget=memory_budget)
        if self.min_duplication is not None and table.duplication < self.min_duplication:
            TABLES.pop(key)
            return None
        return table

    # eager, not traced: inductor's fusion of the input preparation would change the last bits of the result
    # (the kernel itself is a custom op, `elsfast.reduce.cpu_ext` / `cuda_ext`, traceable when called directly)
    @torch._dynamo.disable
    def reduce(
        self,
        queries: torch.Tensor,
        dictionary: Dictionary,
        *,
        abar: float,
        memory_budget: int,
        provenance: bool = False,
    ) -> BackendOutput:
        if provenance:  # the dominant entry must be an entry of the training set, not a distinct key
            return self._cpu_kernel(queries, dictionary, abar, memory_budget, True)
        isa = cpu_ext.choose_isa(self.isa)
        G, M, _ = queries.shape
        threads = kernel_threads()
        q_scale, key_scale = logit_scales(abar)
        states: list[ReduceState | None] = [None] * G
        names, chunks, pairs, undeduplicated = [self.NAME] * G, 0, 0, []
        for g in range(G):
            table = self._table_or_none(dictionary.group(g), memory_budget)
            if table is None:
                undeduplicated.append(g)
                continue
            U, Dv = table.keys.shape
            E = len(table.value_features)
            splits, per_chunk = cpu_ext.plan(U, Dv, E, M, threads, memory_budget)
            splits, per_chunk = self.splits or splits, self.tiles_per_chunk or per_chunk
            inputs = KernelInputs(
                q=(queries[g : g + 1, :, table.features] * q_scale).contiguous(),
                images=table.keys,  # each distinct key an image of Dv pixels, read at offsets 0..Dv-1
                key_offsets=torch.arange(Dv, dtype=torch.int32).view(1, 1, Dv),
                value_offsets=table.value_features.view(1, 1, E).contiguous(),
                key_scale=key_scale,
            )
            m, l, acc, _, _ = cpu_ext.reduce_partials(
                inputs, splits=splits, tiles_per_chunk=per_chunk, provenance=False, threads=threads, isa=isa,
                image_bias=table.bias,
            )  # fmt: skip
            states[g] = fold_partial_states(dictionary, m, l, acc, None, None)
            chunks += math.ceil(math.ceil(U / cpu_ext.EXTENSION.TILE_N) / per_chunk)
            pairs += M * U
        if undeduplicated:
            sub = dictionary.select_groups(undeduplicated)
            out = self._cpu_kernel(queries[undeduplicated], sub, abar, memory_budget, False)
            for i, g in enumerate(undeduplicated):
                states[g] = out.state.take(groups=slice(i, i + 1))
                names[g] = "cpu"
            chunks += out.chunks
            pairs += len(undeduplicated) * M * dictionary.size
        state = ReduceState(*(torch.cat([getattr(s, f) for s in states]) for f in ("m", "l", "acc")))
        return BackendOutput(state, chunks, backends=tuple(names), pairs=pairs)
