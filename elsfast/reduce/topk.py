"""Top-k backend: the softmax over each query's k nearest dictionary entries, with a certified bound on the
posterior mass it leaves out, and the exact path wherever that bound exceeds the tolerance.

With d_j = ||q/a - k_j||^2 and c = a^2 / T, an entry's weight is exp(-c d_j). The k nearest entries (FAISS) are
re-scored exactly (their keys are gathered from the training images, never from the index) and softmaxed in the
queries' dtype. The mass left out, relative to the top-1 weight, is at most

    R = (n_probed - k) exp(-c (d_k - d_1))                                  entries of probed lists (all, for flat)
      + sum over unprobed IVF lists l of  n_l exp(-c (lb_l - d_1)),          lb_l = max(0, |q/a - c_l| - r_l)^2

(r_l: list l's radius, stored at build; triangle inequality), so the neglected fraction of the posterior is at
most eps = R / (L + R), L = sum over the kept entries of exp(-c (d_j - d_1)) >= 1. Distances in R are lowered by
a margin for float32 search rounding and for stored-key rounding (float16). The result then differs from the exact
machine's by at most eps * (max - min of the values) per channel: 2 eps for images in [-1, 1]. HNSW gives no
such bound (its search may miss near entries): `TopK(index="hnsw")` needs `tolerance=None` and reports NaN.

Top-k is approximate: `auto` never runs it; it runs only when asked for (`backend="topk"` or a configured
`TopK(...)`). Policy per group (`reduce`): groups with fewer than `min_entries` entries run exactly; otherwise,
before an index is built, a pilot of 16 queries (exact top-k by brute force) predicts how many queries would meet
the tolerance; below `min_pass_fraction` the group runs exactly and the noise level is remembered (calls skip the
pilot until the noise variance has halved); groups of many images are screened on a subset of them first.
Queries whose bound exceeds the tolerance run exactly (on the backend `auto` picks), so every result is within
tolerance of the exact machine; the report names, per group, what ran ("topk", the exact backend, or both).
Built indexes are kept in a byte-bounded in-memory cache owned by the `TopK` object (`INDEX_CACHE_BYTES`; cleared
by `elsfast.clear_caches()`), and on disk under `cache_dir` (default: `elsfast.common.cache`; none with
`ELSFAST_CACHE=off`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from ..common import cache as disk_cache
from .caches import MemoryCache, content_hash
from .dictionary import Dictionary
from .distinct import DistinctEntries, distinct_entries, resolve_storage
from .registry import FP_TOLERANCES, Backend, BackendOutput, ExactReduce, Tolerance, register_backend
from .state import LOG2E, ReduceState
from .topk_index import (
    KINDS,
    STORAGES,
    GroupIndex,
    build_group_index,
    cache_key,
    faiss_or_reason,
    load_cached,
    save_cached,
)

__all__ = ["INDEX_CACHE_BYTES", "TopK", "neglected_bound"]

PILOT_QUERIES = 16
PILOT_IMAGES = 4096  # larger groups are screened on a subset of about this many images before the full pilot
RETRY_NOISE_FRACTION = 0.5  # after a failed pilot, the next one waits until 1 - abar has fallen to this fraction
SEARCH_SLACK = 4e-5  # relative rounding margin of FAISS's float32 squared distances
INDEX_CACHE_BYTES = 4 << 30  # built indexes kept in memory by one TopK object


def _exact_reduce(
    exact: ExactReduce,
    queries: torch.Tensor,
    dictionary: Dictionary,
    abar: float,
    memory_budget: int,
    provenance: bool,
) -> tuple[BackendOutput, tuple[str, ...], int]:
    """The queries top-k does not answer, on `exact` (the exact reduction `policy.run` passes in: `auto`'s): its
    output, what ran per group and the pairs it scored."""
    backend, out = exact(queries, dictionary, abar=abar, memory_budget=memory_budget, provenance=provenance)
    G, M, _ = queries.shape
    names = out.backends or (backend.NAME,) * G
    return out, names, G * M * dictionary.size if out.pairs is None else out.pairs


def _index_nbytes(gi: GroupIndex) -> int:
    """Memory of a built index: its stored keys and ids, and the tensors beside it."""
    itemsize = {"uint8": 1, "float16": 2}.get(gi.storage, 4)
    tensors = (gi.features, gi.rep_ids, gi.counts, gi.centroids, gi.radius, gi.list_sizes)
    return gi.size * (len(gi.features) * itemsize + 8) + sum(
        t.numel() * t.element_size() for t in tensors if t is not None
    )


def neglected_bound(
    d: torch.Tensor,
    d_k: torch.Tensor,
    rest: torch.Tensor,
    c: float,
    unprobed_sizes: torch.Tensor | None = None,
    unprobed_lower: torch.Tensor | None = None,
    *,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Upper bound on the posterior mass outside the kept entries, per query (module docstring).

    `d` `(m, k)`: exact squared distances of the kept entries (+inf for none); `d_k` `(m,)`: a lower bound on the
    distance of every other entry of the searched lists; `rest` `(m,)`: how many such entries; `c`: the weight
    exp(-c d) scale; `unprobed_sizes`/`unprobed_lower` `(m, L)`: sizes of the unsearched lists (0 for searched ones)
    and lower bounds on their entries' distances; `counts` `(m, k)`: how many entries each kept key stands for
    (default 1). All float64.
    """
    d1 = d.min(dim=1).values
    log_counts = 0.0 if counts is None else torch.log(counts)
    log_l = torch.logsumexp(log_counts - c * (d - d1.unsqueeze(1)), dim=1)
    terms = [torch.log(rest) - c * (d_k - d1)]
    if unprobed_sizes is not None:
        terms.append(torch.logsumexp(torch.log(unprobed_sizes) - c * (unprobed_lower - d1.unsqueeze(1)), dim=1))
    log_r = torch.logsumexp(torch.stack(terms, dim=1), dim=1)
    return torch.exp(log_r - torch.logaddexp(log_l, log_r))


@register_backend
@dataclass(frozen=True, eq=False)
class TopK(Backend):
    """The top-k backend (`backend="topk"` uses the defaults; pass `TopK(...)` as `backend=` to set options).

    Args:
        k: nearest entries kept per query.
        tolerance: largest certified neglected posterior mass accepted; queries above it run exactly. None: keep
            every top-k result and only report its bound (needed for HNSW).
        index: "ivf" (certified, fast), "flat" (exact search; on a CPU no faster than the exact softmax) or "hnsw".
        nlist, nprobe: IVF lists (default about 4 sqrt(n), at most 4096) and lists searched per query.
        storage: "auto" (uint8 for uint8 training images: exact and 4x smaller; float32 otherwise), "float32",
            "float16" or "uint8".
        min_entries: groups with fewer entries run exactly.
        min_pass_fraction: skip building an index when the pilot predicts fewer queries than this meet the
            tolerance.
        cache_dir: where built indexes are kept (default `elsfast.common.cache.cache_dir("indexes")`:
            `$ELSFAST_CACHE/indexes`, else `~/.cache/elsfast/indexes`, and none with `ELSFAST_CACHE=off`); "" keeps
            them in memory only. Indexes are also kept in memory for the life of this object.
        progress: progress bar and memory estimate while building.
    """

    k: int = 128
    tolerance: float | None = 1e-4
    index: str = "ivf"
    nlist: int | None = None
    nprobe: int = 32
    storage: str = "auto"
    min_entries: int = 1 << 22
    min_pass_fraction: float = 0.5
    cache_dir: str | None = None
    progress: bool = True
    _indexes: MemoryCache = field(
        default_factory=lambda: MemoryCache("topk indexes", INDEX_CACHE_BYTES, _index_nbytes), init=False, repr=False
    )
    _failed_abar: MemoryCache = field(
        default_factory=lambda: MemoryCache("topk failed pilots", 1 << 20, lambda abar: 64), init=False, repr=False
    )

    NAME = "topk"
    EXACT = False
    LIMITS: ClassVar[dict[str, str]] = {
        "faiss": "needs faiss",
        "storage": "storage='uint8' needs uint8 training images",
    }

    def __post_init__(self) -> None:
        if int(self.k) < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.tolerance is not None and not 0.0 < self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1) or None, got {self.tolerance}")
        if self.index not in KINDS:
            raise ValueError(f"index must be one of {KINDS}, got {self.index!r}")
        if self.storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if self.index == "hnsw" and self.tolerance is not None:
            raise ValueError("HNSW search gives no certified bound on the neglected mass: use tolerance=None")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {self.nprobe}")

    def options(self) -> dict:
        names = ("k", "tolerance", "index", "nlist", "nprobe", "storage", "min_entries", "min_pass_fraction")
        return {name: getattr(self, name) for name in names} | {"cache_dir": self.cache_dir}

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        faiss, why = faiss_or_reason()
        reasons = [] if faiss is not None else [self.refuse("faiss", why)]
        if self.storage == "uint8" and dictionary.images.dtype != torch.uint8:
            reasons.append(self.refuse("storage", f"the images are {dictionary.images.dtype}"))
        return reasons

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """The exact backends' tolerance plus twice the certified neglected mass (values lie in [-1, 1]); infinite
        without a tolerance (uncertified)."""
        exact = FP_TOLERANCES[dtype]
        extra = math.inf if self.tolerance is None else 2.0 * self.tolerance
        return Tolerance(exact.per_logit, exact.absolute + extra)

    # ------------------------------------------------------------------------------------------------------------

    def _cache_dir(self) -> Path | None:
        if self.cache_dir == "":
            return None
        return Path(self.cache_dir) if self.cache_dir is not None else disk_cache.cache_dir("indexes")

    def _key(self, dg: Dictionary) -> str:
        return cache_key(dg, self.index, resolve_storage(self.storage, self.index, dg.images), self.nlist)

    def _group_index(
        self, dg: Dictionary, key: str, q: torch.Tensor, abar: float, memory_budget: int
    ) -> GroupIndex | None:
        """The group's index (`key`: `_key(dg)`): from memory or the disk cache; else built, unless the pilot (on
        a few queries of `q`, at noise `abar`) predicts too few queries would meet the tolerance (then None). After
        a failed pilot the group runs exactly without another pilot until the noise variance 1 - abar has fallen
        to `RETRY_NOISE_FRACTION` of the failed level's: a pilot reads the whole group, and a sampler lowers the
        noise a little at every step."""
        hit = self._indexes.get(key)
        if hit is not None:
            return hit
        cache = self._cache_dir()
        gi = load_cached(cache, key)
        if gi is None:
            failed = self._failed_abar.get(key)
            if failed is not None and 1.0 - abar > RETRY_NOISE_FRACTION * (1.0 - failed):
                return None  # not much less noisy than a level at which the pilot failed
            step = dg.num_images // PILOT_IMAGES
            if self.tolerance is not None and step > 1:
                # screen on every step-th image first: reading the whole group costs as much as an exact step
                screen = distinct_entries(replace(dg, images=dg.images[::step], image_ids=None), self.storage)
                if not self._pilot_passes(screen, q, abar, total=dg.size):
                    self._remember_failure(key, abar)
                    return None
            entries = distinct_entries(dg, self.storage, memory_budget=memory_budget)
            if self.tolerance is not None and not self._pilot_passes(entries, q, abar):
                self._remember_failure(key, abar)
                return None
            gi = build_group_index(entries, kind=self.index, nlist=self.nlist, progress=self.progress)
            save_cached(cache, key, gi)
        self._indexes.put(key, gi, tags=[content_hash(dg.images)])
        return gi

    def _remember_failure(self, key: str, abar: float) -> None:
        """Too few queries of group `key` were (or would be) certified at noise `abar`: keep the least noisy such
        level, from which `_group_index` waits for the noise to halve before the next pilot."""
        self._failed_abar.put(key, max(abar, self._failed_abar.get(key) or 0.0))

    def _pilot_passes(self, entries: DistinctEntries, q: torch.Tensor, abar: float, total: int | None = None) -> bool:
        """Exact top-k of a few queries by brute force over the distinct entries: would enough of them be certified?
        With `total`, `entries` are those of a subset of the group's images and the group has `total` entries: the
        multiplicities are scaled up to it. A subset's nearest keys lie farther apart than the whole group's, so
        the screen errs towards passing; only a failure is trusted without the full pilot."""
        a, c = math.sqrt(abar), abar / (2.0 * (1.0 - abar)) / entries.scale**2
        rows = torch.linspace(0, q.shape[0] - 1, min(PILOT_QUERIES, q.shape[0])).round().long()
        x = entries.to_units(q[rows].cpu().double() / a)
        U = len(entries.counts)
        k = min(self.k, U)
        best_d = torch.full((len(rows), k), torch.inf, dtype=torch.float64)
        best_i = torch.zeros((len(rows), k), dtype=torch.int64)
        step = max(1, (1 << 22) // max(1, x.shape[1]))
        for start in range(0, U, step):
            d = torch.cdist(x, entries.unit_rows(start, start + step).double()).square_()
            i = torch.arange(start, start + d.shape[1]).expand(len(rows), -1)
            best_d, pick = torch.cat([best_d, d], dim=1).topk(k, dim=1, largest=False)
            best_i = torch.cat([best_i, i], dim=1).gather(1, pick)
        counts = entries.counts[best_i] * (1.0 if total is None else total / entries.total)
        rest = (entries.total if total is None else total) - counts.sum(1)
        passed = neglected_bound(best_d, best_d[:, -1], rest, c, counts=counts) <= self.tolerance
        return bool(passed.double().mean() >= self.min_pass_fraction)

    def _search_block(
        self, gi: GroupIndex, dg: Dictionary, q: torch.Tensor, abar: float, provenance: bool
    ) -> tuple[ReduceState, torch.Tensor, torch.Tensor]:
        """Top-k state `(1, m)`, neglected-mass bound `(m,)` and the kept entries' local ids `(m, k)` (-1: none)
        for the queries `q` `(m, D)` of one group. Each kept key stands for `count` equal entries."""
        a, T = math.sqrt(abar), 2.0 * (1.0 - abar)
        c = a * a / T / gi.scale**2  # weight exp(-c d) for d in index units
        x = gi.to_units(q.cpu() / a)
        k = min(self.k, gi.size)
        dist, rows, probe = gi.search(x, k, self.nprobe)
        found = rows >= 0
        safe = rows.clamp(min=0)
        ids, counts = gi.rep_ids[safe], torch.where(found, gi.counts[safe], 0.0)
        keys, values = dg.gather(ids.to(dg.images.device), q.dtype)
        keys, values = keys.to(q.device), values.to(q.device)
        # exact logits in bits, as the exact path computes them (up to its rounding)
        logits = -((q.unsqueeze(1) - a * keys).square().sum(-1)) * (LOG2E / T)
        logits = torch.where(found.to(q.device), logits, -torch.inf)
        global_ids = dg.global_ids(ids).to(q.device).unsqueeze(0) if provenance else None
        state = ReduceState.from_query_logits(
            logits.unsqueeze(0), values.unsqueeze(0), global_ids, counts.to(q.device, q.dtype).unsqueeze(0)
        )
        ids = torch.where(found, ids, -1)
        if self.tolerance is None and gi.kind == "hnsw":
            return state, torch.full((q.shape[0],), torch.nan, dtype=torch.float64), ids
        d = torch.where(found, (x.unsqueeze(1) - gi.to_units(keys.cpu())).square().sum(-1), torch.inf)
        # every entry of the searched lists that was not returned lies at least this far (search rounding, query
        # rounding to float32, stored-key rounding)
        x_err = (x - x.float().double()).norm(dim=1) + gi.key_error
        lowered = dist[:, -1] - SEARCH_SLACK * (x.square().sum(1) + gi.max_norm2)
        d_k = (lowered.clamp(min=0).sqrt() - x_err).clamp(min=0).square()
        kept = counts.sum(1)
        if probe is None:
            searched = torch.full_like(kept, float(gi.total))
            sizes = lower = None
        else:
            sizes = gi.list_sizes.expand(len(x), -1).clone()
            searched = sizes.gather(1, probe).sum(1)
            sizes.scatter_(1, probe, 0.0)
            lower = (torch.cdist(x, gi.centroids) - gi.radius).clamp(min=0).square()
        rest = torch.where(found.sum(1) < k, 0.0, (searched - kept).clamp(min=0))
        return state, neglected_bound(d, d_k, rest, c, sizes, lower, counts=counts), ids

    def reduce(
        self,
        queries: torch.Tensor,
        dictionary: Dictionary,
        *,
        abar: float,
        memory_budget: int,
        provenance: bool = False,
        exact: ExactReduce,
    ) -> BackendOutput:
        """Top-k where its bound is within tolerance, `exact` (given by `policy.run`: the exact backend `auto`
        picks) for the other queries and the groups top-k does not pay for (module docstring)."""
        G, M, D = queries.shape
        dtype, device = queries.dtype, queries.device
        state = ReduceState.empty(G, M, dictionary.value_dim, dtype=dtype, device=device, provenance=provenance)
        neglected = torch.zeros(G, M, dtype=torch.float64)
        chunks, approximate, pairs = 0, 0, 0
        names = [""] * G
        whole_groups: list[int] = []  # groups that run exactly, all together
        for g in range(G):
            dg = dictionary.group(g)
            if dg.size < self.min_entries:
                whole_groups.append(g)
                continue
            key = self._key(dg)
            gi = self._group_index(dg, key, queries[g], abar, memory_budget)
            if gi is None:
                whole_groups.append(g)
                continue
            block = max(1, (memory_budget // 4) // max(1, self.k * (D + dictionary.value_dim) * 8))
            rows_exact, group_approximate = [], 0
            for lo in range(0, M, block):
                rows = torch.arange(lo, min(M, lo + block), device=device)
                sub, bound, ids = self._search_block(gi, dg, queries[g, rows], abar, provenance)
                ok = torch.ones_like(bound, dtype=torch.bool) if self.tolerance is None else bound <= self.tolerance
                if ok.any():
                    pick = ok.nonzero().flatten()
                    state.assign_(g, rows[pick.to(device)], sub.take(rows=pick.to(device)))
                    neglected[g, rows[pick].cpu()] = bound[pick]
                    group_approximate += int(ok.sum())
                    pairs += int((ids[pick] >= 0).sum())
                rows_exact.append(rows[(~ok).to(device)])
            rows_exact = torch.cat(rows_exact)
            if self.tolerance is not None and len(rows_exact) > M * (1 - self.min_pass_fraction):
                self._remember_failure(key, abar)
            parts = [self.NAME] if group_approximate else []
            if len(rows_exact):
                out, exact_names, exact_pairs = _exact_reduce(
                    exact, queries[g : g + 1, rows_exact], dg, abar, memory_budget, provenance
                )
                state.assign_(g, rows_exact, out.state)
                chunks += out.chunks
                pairs += exact_pairs
                parts.append(exact_names[0])
            names[g] = "+".join(parts)
            approximate += group_approximate
        if whole_groups:
            sub = dictionary.select_groups(whole_groups)
            out, exact_names, exact_pairs = _exact_reduce(
                exact, queries[whole_groups], sub, abar, memory_budget, provenance
            )
            for i, g in enumerate(whole_groups):
                state.assign_(g, torch.arange(M, device=device), out.state.take(groups=slice(i, i + 1)))
                names[g] = exact_names[i]
            chunks += out.chunks
            pairs += exact_pairs
        return BackendOutput(state, chunks, neglected.to(device), approximate, tuple(names), pairs)
