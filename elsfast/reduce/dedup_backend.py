"""Dedup backend: the exact softmax over each group's *distinct* entries, every distinct key weighted by how often
it occurs, on the `cpu` kernel (csrc/cpu_kernel.inc with a per-key logit bias of log2(count) bits).

Equal keys have equal logits and equal values (a patch's value is its own centre pixel), so summing each distinct
key once with weight `count` gives the same softmax as summing every entry: the result is exact, not approximate,
and costs `distinct / total` of the `cpu` kernel's pairs. On MNIST (60,000 digits, interior and edge border
classes) a distinct key stands for 6.9 entries at P = 3, 3.6 at P = 5 and 2.5 at P = 7: flat backgrounds repeat
one patch millions of times. Natural RGB images barely repeat a patch, and `auto` passes the backend by there.

The distinct keys of a group are found once (hash, then verified exactly: `elsfast.reduce.distinct`) and kept in
memory, named by the content hash of the training images and the group's positions, so the steps of a sample
that share a patch size share them; the cache holds at most `CACHE_BYTES`. `auto` builds them to learn how
often keys repeat, and drops those that repeat too little (CIFAR-10: 1.004 entries per key at P = 3), keeping
only their counts. Memory: the table is `distinct x features` bytes for uint8 images (1.1 GB for MNIST at P = 7),
its build holds every entry's key once (`entries x features` bytes, 2.9 GB there). With provenance the backend
runs the `cpu` kernel, whose dominant entry is an entry of the training set rather than a distinct key.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..threads import kernel_threads
from .cpu_backend import Cpu, check_options, choose_isa, cpu_kernel_reasons, plan
from .dictionary import Dictionary, PatchDictionary
from .distinct import content_hash, describe, distinct_entries
from .partials import empty_partial_states, fold_partial_states, import_extension
from .registry import Backend, BackendOutput, register_backend
from .state import ReduceState, logit_scales

__all__ = [
    "AUTO_MAX_PATCH_SIZE",
    "AUTO_MIN_DUPLICATION",
    "AUTO_MIN_ENTRIES",
    "Dedup",
    "DistinctTable",
    "distinct_table",
]

log = logging.getLogger("elsfast")

# `auto` takes the backend for patch dictionaries of uint8 or float32 images with patches of at most
# AUTO_MAX_PATCH_SIZE (beyond it the `shifts` kernel does more per pair than deduplication saves: MNIST repeats a
# 9 x 9 patch 1.9 times and dedup runs at 0.75x the shifts kernel there), groups of at least AUTO_MIN_ENTRIES
# entries (smaller ones cost more to deduplicate than they take to reduce) and at least AUTO_MIN_DUPLICATION
# entries per distinct key over the problem's groups (benchmarks/bench_cpu.py::test_dedup_vs_exact_kernels).
AUTO_MAX_PATCH_SIZE = 7
AUTO_MIN_ENTRIES = 1 << 20
AUTO_MIN_DUPLICATION = 1.5
CACHE_BYTES = 4 << 30
BUILD_BUDGET = 512 << 20  # working memory of a table's build, apart from the keys it collects (auto's builds)


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


_CACHE: OrderedDict[str, DistinctTable] = OrderedDict()
_COUNTS: dict[str, tuple[int, int]] = {}  # (entries, distinct keys) of every table built, kept when it is dropped


def _table_key(dg: Dictionary) -> str:
    digest = hashlib.sha256(content_hash(dg.images).encode())
    digest.update(describe(dg))
    return digest.hexdigest()


def distinct_table(dg: PatchDictionary, *, memory_budget: int) -> DistinctTable:
    """The distinct keys of the one-group patch dictionary `dg`, from the cache or built (and cached)."""
    key = _table_key(dg)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
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
    _CACHE[key] = table
    _COUNTS[key] = (table.total, table.keys.shape[0])
    while len(_CACHE) > 1 and sum(t.nbytes for t in _CACHE.values()) > CACHE_BYTES:
        _CACHE.popitem(last=False)
    return table


@register_backend
@dataclass(frozen=True)
class Dedup(Backend):
    """The `cpu` kernel over each group's distinct entries with log-count biases, for patch dictionaries on CPU
    tensors (exact). Options as `Cpu`.

    Args:
        splits: partial states per query; None: enough work units for two per thread.
        tiles_per_chunk: key tiles of 256 distinct keys packed at once; None: about 2 MB.
        isa: "auto" (AVX-512 over AVX2), "avx2" or "avx512".
    """

    splits: int | None = None
    tiles_per_chunk: int | None = None
    isa: str = "auto"

    NAME = "dedup"
    PRIORITY = 52  # after topk (50); before shifts (55) and cpu (60), where the entries repeat

    def __post_init__(self) -> None:
        check_options(self, ("splits", "tiles_per_chunk"))

    def options(self) -> dict:
        return {"splits": self.splits, "tiles_per_chunk": self.tiles_per_chunk, "isa": self.isa}

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        reasons = cpu_kernel_reasons(self.isa, queries, dictionary)
        if not isinstance(dictionary, PatchDictionary):
            reasons.append("not a patch dictionary (IS/ES run on torch)")
        return reasons

    def auto_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        reasons = self.unsupported_reasons(queries, dictionary)
        if reasons:
            return reasons
        if dictionary.patch_size > AUTO_MAX_PATCH_SIZE:
            return [f"patch size {dictionary.patch_size}: above {AUTO_MAX_PATCH_SIZE} patches rarely repeat"]
        if dictionary.size < AUTO_MIN_ENTRIES:
            return [
                f"{dictionary.size} entries a group: below {AUTO_MIN_ENTRIES} deduplicating costs more than it saves"
            ]
        # builds the tables once: they are cached for the reduction and later calls, or, when they save too
        # little, dropped, and only their counts are remembered
        groups = [dictionary.group(g) for g in range(dictionary.num_groups)]
        names = [_table_key(dg) for dg in groups]
        for dg, name in zip(groups, names, strict=True):
            if name not in _COUNTS:
                distinct_table(dg, memory_budget=BUILD_BUDGET)
        duplication = sum(_COUNTS[name][0] for name in names) / sum(_COUNTS[name][1] for name in names)
        if duplication < AUTO_MIN_DUPLICATION:
            for name in names:
                _CACHE.pop(name, None)
            return [f"{duplication:.2f} entries per distinct key: below {AUTO_MIN_DUPLICATION} it saves too little"]
        return []

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
            cpu = Cpu(splits=self.splits, tiles_per_chunk=self.tiles_per_chunk, isa=self.isa)
            return cpu.reduce(queries, dictionary, abar=abar, memory_budget=memory_budget, provenance=True)
        ext = import_extension("elsfast._cpu")
        isa = choose_isa(ext, self.isa)
        G, M, _ = queries.shape
        threads = kernel_threads()
        q_scale, key_scale = logit_scales(abar)
        states, chunks = [], 0
        for g in range(G):
            table = distinct_table(dictionary.group(g), memory_budget=memory_budget)
            U, Dv = table.keys.shape
            E = len(table.value_features)
            splits, per_chunk = plan(ext, U, Dv, E, M, threads, memory_budget)
            splits, per_chunk = self.splits or splits, self.tiles_per_chunk or per_chunk
            q = (queries[g : g + 1, :, table.features] * q_scale).contiguous()
            key_offsets = torch.arange(Dv, dtype=torch.int32).view(1, 1, Dv)
            value_offsets = table.value_features.view(1, 1, E).contiguous()
            m, l, acc, best, u = empty_partial_states(splits, 1, M, E, queries.device)
            pointers = (t.data_ptr() for t in (q, table.keys, key_offsets, value_offsets, m, l, acc, best, u))
            ext.reduce(
                *pointers, 1, M, U, 1, Dv, E, Dv, splits, per_chunk, key_scale,
                table.keys.dtype == torch.uint8, False, threads, isa, table.bias.data_ptr(),
            )  # fmt: skip
            states.append(fold_partial_states(dictionary, m, l, acc, None, None))
            chunks += math.ceil(math.ceil(U / ext.TILE_N) / per_chunk)
        state = ReduceState(*(torch.cat([getattr(s, f) for s in states]) for f in ("m", "l", "acc")))
        return BackendOutput(state, chunks)
