"""In-memory caches of data derived from training sets (dedup tables, top-k indexes), each with an owner, a byte
bound and a way to clear it, and the content hashes that name training sets.

Every `MemoryCache` is registered here (weakly: a cache owned by an object dies with it), so
`clear_caches()` empties them all, and `clear_caches(tag)` only the entries derived from one training set (tag:
its `content_hash`), which is what `ScoreMachine.clear_cache()` does. Nothing here keeps a training set alive:
the content-hash memo holds weak references only.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

from ..common.fingerprint import training_set_sha256

__all__ = ["MemoryCache", "cache_info", "clear_caches", "content_hash"]

_CACHES: weakref.WeakSet[MemoryCache] = weakref.WeakSet()


class MemoryCache:
    """A least-recently-used map from keys to values derived from training sets, holding at most `max_bytes`
    (`sizeof(value)` bytes each; the newest entry is kept even when it alone exceeds the bound). Entries carry
    tags (the content hashes of the training sets they derive from) so they can be cleared per training set."""

    def __init__(self, name: str, max_bytes: int, sizeof: Callable[[Any], int]) -> None:
        self.name, self.max_bytes, self.sizeof = name, int(max_bytes), sizeof
        self._entries: OrderedDict[Hashable, tuple[Any, int, frozenset[str]]] = OrderedDict()
        _CACHES.add(self)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return sum(size for _, size, _ in self._entries.values())

    def get(self, key: Hashable) -> Any | None:
        """The value under `key` (now the most recently used), or None."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: Hashable, value: Any, *, tags: Iterable[str] = ()) -> None:
        """Store `value` under `key`, then drop the least recently used entries beyond the byte bound."""
        self._entries[key] = (value, int(self.sizeof(value)), frozenset(tags))
        self._entries.move_to_end(key)
        while len(self._entries) > 1 and self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)

    def pop(self, key: Hashable) -> Any | None:
        """Remove and return the value under `key` (None when absent)."""
        hit = self._entries.pop(key, None)
        return None if hit is None else hit[0]

    def clear(self, tag: str | None = None) -> int:
        """Drop every entry (or those tagged `tag`); returns how many were dropped."""
        keys = [k for k, (_, _, tags) in self._entries.items() if tag is None or tag in tags]
        for key in keys:
            del self._entries[key]
        return len(keys)

    def info(self) -> dict:
        return {"name": self.name, "entries": len(self), "bytes": self.nbytes, "max_bytes": self.max_bytes}


def clear_caches(tag: str | None = None) -> int:
    """Empty every in-memory cache of `elsfast.reduce` (or only the entries derived from the training set whose
    `content_hash` is `tag`); returns how many entries were dropped. Disk caches are left alone."""
    return sum(cache.clear(tag) for cache in list(_CACHES))


def cache_info() -> list[dict]:
    """Name, entries, bytes and byte bound of every live in-memory cache."""
    return sorted((cache.info() for cache in list(_CACHES)), key=lambda info: info["name"])


# id(tensor) -> (weak reference, version counter, digest). The weak reference's callback removes the entry, so an
# id is never matched to other data and no tensor is kept alive by the memo.
_CONTENT: dict[int, tuple[weakref.ref, int, str]] = {}


def _forget(key: int) -> Callable[[weakref.ref], None]:
    def callback(ref: weakref.ref) -> None:
        hit = _CONTENT.get(key)
        if hit is not None and hit[0] is ref:
            del _CONTENT[key]

    return callback


def content_hash(images: torch.Tensor) -> str:
    """`elsfast.common.fingerprint.training_set_sha256` of `images`, remembered while the tensor lives and is
    unchanged."""
    key = id(images)
    hit = _CONTENT.get(key)
    if hit is not None and hit[0]() is images and hit[1] == images._version:
        return hit[2]
    digest = training_set_sha256(images)
    _CONTENT[key] = (weakref.ref(images, _forget(key)), images._version, digest)
    return digest
