"""FAISS indexes over one group's dictionary, for the top-k backend: build, search, and cache on disk.

One index per group (ELS border class, LS pixel, one class's images when conditional), built from the training
images chunk by chunk. Only the features that vary between entries are indexed (zero padding makes some of a
border class's features constant; they shift every distance equally). Index units: keys k in [-1, 1] are stored
as `u = (k + offset) * scale`; uint8 training images use scale = 127.5, offset = 1, so the pixel values 0..255 are
stored exactly in FAISS's 8-bit direct scalar quantizer (4x less memory than float32, exact distances).

Kinds: `flat` (exact search), `ivf` (inverted lists; each list's radius around its centroid is stored, which gives
a certified lower bound on the distance of every entry of an unprobed list), `hnsw` (graph; no certified bound).

A cache file is `torch.save` of the index and its metadata, followed by the SHA-256 of those bytes and a magic
trailer; a file whose checksum does not match, or that does not load, is reported and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .caches import content_hash
from .dictionary import Dictionary
from .distinct import DistinctEntries, describe, to_units

__all__ = [
    "GroupIndex",
    "build_group_index",
    "faiss_or_reason",
    "load_cached",
    "save_cached",
]

log = logging.getLogger("elsfast")

INDEX_FORMAT = 1
MAGIC = b"ELSFAST-INDEX-1\n"
KINDS = ("flat", "ivf", "hnsw")
STORAGES = ("auto", "float32", "float16", "uint8")
_FP16_REL = 2.0**-11  # relative rounding of float16
_FP32_REL = 2.0**-23
_FIELDS = (
    "kind",
    "storage",
    "features",
    "scale",
    "offset",
    "size",
    "max_norm2",
    "key_error",
    "rep_ids",
    "counts",
    "total",
)


def faiss_or_reason():
    """(the faiss module, None), or (None, why it cannot be imported)."""
    try:
        import faiss
    except ImportError as err:
        return None, f"faiss is not installed ({err}); pip install 'elsfast[faiss]'"
    return faiss, None


@dataclass
class GroupIndex:
    """A built index over one group's distinct entries (FAISS ids: rows `0..size-1`).

    `features` `(Dv,)`: the key features indexed. `scale`, `offset`: index units (module docstring). `rep_ids`
    `(size,)`: an entry id (`image * S + s`, local to the dictionary's images) per row; `counts` `(size,)`: how many
    entries share the row's key; `total`: entries. For IVF, `centroids` `(L, Dv)` float64, `radius` `(L,)` (max
    distance of a list's entries to its centroid, index units, rounding included) and `list_sizes` `(L,)` (entries,
    with multiplicity). `key_error`: bound on |stored key - true key| (index units). `max_norm2`: max squared
    norm of an entry (index units).
    """

    index: object
    kind: str
    storage: str
    features: torch.Tensor
    scale: float
    offset: float
    size: int
    max_norm2: float
    key_error: float
    rep_ids: torch.Tensor
    counts: torch.Tensor
    total: int
    centroids: torch.Tensor | None = None
    radius: torch.Tensor | None = None
    list_sizes: torch.Tensor | None = None

    def to_units(self, keys: torch.Tensor) -> torch.Tensor:
        return to_units(keys, self.features, self.offset, self.scale)

    def search(self, x: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """k nearest entries of `x` `(m, Dv)` (index units, float64): squared distances `(m, k)` (float64, index
        units, +inf where fewer than k were found), ids `(m, k)` (-1 there), and for IVF the probed lists `(m, nprobe)`.
        """
        x32 = np.ascontiguousarray(x.float().numpy())
        if self.kind != "ivf":
            if self.kind == "hnsw":
                self.index.hnsw.efSearch = max(2 * k, 64)
            d, ids = self.index.search(x32, k)
            return _as_dist(d, ids), torch.from_numpy(ids), None
        cd = centroid_distances(x, self.centroids)
        nprobe = min(nprobe, len(self.centroids))
        dq, probe = cd.topk(nprobe, dim=1, largest=False)
        self.index.nprobe = nprobe
        d, ids = self.index.search_preassigned(
            x32, k, np.ascontiguousarray(probe.numpy()), np.ascontiguousarray(dq.float().numpy())
        )
        return _as_dist(d, ids), torch.from_numpy(ids), probe


def _as_dist(d: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    d = torch.from_numpy(d).double()
    return torch.where(torch.from_numpy(ids) >= 0, d, torch.inf)


def centroid_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared distances `(m, L)` of `x` `(m, Dv)` to the centroids, float64, computed as differences (no
    cancellation)."""
    out = torch.empty(x.shape[0], centroids.shape[0], dtype=torch.float64)
    step = max(1, (1 << 24) // max(1, centroids.numel()))
    for i in range(0, x.shape[0], step):
        out[i : i + step] = torch.cdist(x[i : i + step], centroids).square_()
    return out


def cache_key(dg: Dictionary, kind: str, storage: str, nlist: int | None) -> str:
    """Content hash naming one group index: training images, entries, index kind and parameters, versions."""
    import faiss

    digest = hashlib.sha256(repr((INDEX_FORMAT, faiss.__version__, kind, storage, nlist)).encode())
    digest.update(content_hash(dg.images).encode())
    digest.update(describe(dg))
    return digest.hexdigest()[:32]


def default_nlist(n: int) -> int:
    """Inverted lists for n entries: about 4 sqrt(n), at most 4096 (assigning every entry costs n * nlist * Dv)."""
    return int(min(4096, max(1, round(4 * math.sqrt(n)))))


def build_group_index(
    entries: DistinctEntries, *, kind: str = "ivf", nlist: int | None = None, progress: bool = True, seed: int = 0
) -> GroupIndex:
    """Build the index over a group's distinct entries (FAISS ids: rows of `entries`)."""
    faiss, reason = faiss_or_reason()
    if faiss is None:
        raise RuntimeError(reason)
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    storage, (U, Dv) = entries.storage, entries.keys.shape
    qtype = {"uint8": faiss.ScalarQuantizer.QT_8bit_direct, "float16": faiss.ScalarQuantizer.QT_fp16}.get(storage)
    if storage == "uint8" and Dv % 32 == 0:
        # FAISS 1.15 rounds the query to bytes for 8-bit direct codes when d % 32 == 0 (measured: distances off by
        # 75%); float16 holds the pixel values 0..255 exactly as well, at 2 bytes per feature
        qtype = faiss.ScalarQuantizer.QT_fp16
    per_entry = {"uint8": 1, "float16": 2, "float32": 4}[storage] * Dv + 8 + (2 * 32 * 4 if kind == "hnsw" else 0)
    estimate = U * per_entry
    message = (
        f"building a {kind} top-k index: {U:,} distinct entries (of {entries.total:,}) x {Dv} features "
        f"({storage}), about {estimate / 2**20:,.0f} MB"
    )
    if progress and estimate > 64 << 20:
        print(f"elsfast: {message}", file=sys.stderr)
    log.info(message)

    centroids = radius = list_sizes = None
    if kind == "flat":
        index = faiss.IndexFlatL2(Dv) if qtype is None else faiss.IndexScalarQuantizer(Dv, qtype, faiss.METRIC_L2)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(Dv, 32) if qtype is None else faiss.IndexHNSWSQ(Dv, qtype, 32)
    else:
        nlist = min(nlist or default_nlist(U), U)
        quantizer = faiss.IndexFlatL2(Dv)
        if qtype is None:
            index = faiss.IndexIVFFlat(quantizer, Dv, nlist, faiss.METRIC_L2)
        else:  # by_residual=False: codes are the keys themselves, so 8-bit direct stays exact
            index = faiss.IndexIVFScalarQuantizer(quantizer, Dv, nlist, qtype, faiss.METRIC_L2, False)
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randperm(U, generator=generator)[: min(U, 40 * nlist)]  # FAISS asks for >= 39 per list
        index.train(np.ascontiguousarray(entries.keys[sample].float().numpy()))
        centroids = torch.from_numpy(quantizer.reconstruct_n(0, nlist)).double()
        radius = torch.zeros(nlist, dtype=torch.float64)
        list_sizes = torch.zeros(nlist, dtype=torch.float64)

    step = max(1, (1 << 24) // max(1, Dv))
    max_norm2 = 0.0
    bar = tqdm(total=U, desc=f"index {kind}", unit="entry", unit_scale=True, disable=not progress, leave=False)
    for start in range(0, U, step):
        x = entries.unit_rows(start, start + step).contiguous()
        max_norm2 = max(max_norm2, float(x.double().square().sum(1).max()))
        x32 = x.numpy()
        if kind == "ivf":
            _, assign = quantizer.search(x32, 1)
            assign = np.ascontiguousarray(assign[:, 0])
            a = torch.from_numpy(assign)
            d2 = (x.double() - centroids[a]).square_().sum(1)
            radius.scatter_reduce_(0, a, d2.sqrt(), reduce="amax")
            list_sizes.scatter_add_(0, a, entries.counts[start : start + step])
            ids = np.arange(start, start + len(x32), dtype=np.int64)
            index.add_core(len(x32), faiss.swig_ptr(x32), faiss.swig_ptr(ids), faiss.swig_ptr(assign))
        else:
            index.add(x32)
        bar.update(len(x32))
    bar.close()

    # float32 keys of float64 training images, and float16 storage, move a stored key by at most key_error
    key_error = math.sqrt(max_norm2) * (_FP16_REL if storage == "float16" else _FP32_REL) + 1e-12 * entries.scale
    if kind == "ivf":
        radius = radius * (1 + 1e-12) + key_error
    return GroupIndex(
        index, kind, storage, entries.features, entries.scale, entries.offset, U, max_norm2, key_error,
        entries.rep_ids, entries.counts, entries.total, centroids, radius, list_sizes,
    )  # fmt: skip


def _save(path: Path, gi: GroupIndex, key: str) -> None:
    import faiss

    from ..common.fileio import atomic_write

    payload = {
        "format": INDEX_FORMAT,
        "key": key,
        "index": torch.from_numpy(faiss.serialize_index(gi.index)),
        "fields": {name: getattr(gi, name) for name in _FIELDS},
        "ivf": {name: getattr(gi, name) for name in ("centroids", "radius", "list_sizes")},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    # the cache directory is elsfast's own: a corrupted index file there is replaced, not refused
    atomic_write(path, lambda f: f.write(data + hashlib.sha256(data).digest() + MAGIC), replace="any")


def _load(path: Path, key: str) -> GroupIndex:
    """Load a cache file; raises ValueError when it is corrupted or is not the index of `key`."""
    import faiss

    raw = path.read_bytes()
    if len(raw) < 32 + len(MAGIC) or not raw.endswith(MAGIC):
        raise ValueError("truncated or not an elsfast index file")
    data, digest = raw[: -32 - len(MAGIC)], raw[-32 - len(MAGIC) : -len(MAGIC)]
    if hashlib.sha256(data).digest() != digest:
        raise ValueError("checksum mismatch")
    payload = torch.load(io.BytesIO(data), weights_only=True)
    if payload.get("format") != INDEX_FORMAT or payload.get("key") != key:
        raise ValueError("the file holds another index")
    index = faiss.deserialize_index(payload["index"].numpy())
    return GroupIndex(index, **payload["fields"], **payload["ivf"])


def cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.faissidx"


def load_cached(cache_dir: Path | None, key: str) -> GroupIndex | None:
    """The cached index `key`, or None when there is none or it is unusable (corrupted, stale: reported)."""
    if cache_dir is None:
        return None
    path = cache_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        return _load(path, key)
    except Exception as err:  # any failure to read it back means the file cannot be trusted
        warnings.warn(f"elsfast: index cache {path} is unusable ({err}); rebuilding it", stacklevel=2)
        return None


def save_cached(cache_dir: Path | None, key: str, gi: GroupIndex) -> None:
    if cache_dir is not None:
        _save(cache_path(cache_dir, key), gi, key)
