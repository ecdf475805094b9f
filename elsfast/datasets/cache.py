"""The disk cache of decoded datasets: where a decoded array is kept and how it is read back.

A decoded array (the CIFAR-10 JPEG copy, decoded) is stored as `.npy` in `elsfast.common.cache.cache_dir()` under a
name keyed on the source file's path, mtime and size (`cache_file`), written with
`elsfast.common.fileio.atomic_write(..., replace="any")` by its owner, and read back by `load_cached_array`, which
treats anything unreadable or of the wrong shape as absent. With `ELSFAST_CACHE=off` there is no cache file and
nothing is written. This module imports numpy, the standard library and `elsfast.common` only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..common.cache import cache_dir

__all__ = ["CACHE_FORMAT", "cache_file", "load_cached_array"]

CACHE_FORMAT = 1
"""Part of every cache key: raise it when the layout of a cached array changes."""


def cache_file(path: str, mtime_ns: int, size: int) -> Path | None:
    """The cache file of the decoded contents of `path` (as of `mtime_ns` and `size`); None when caching is off."""
    d = cache_dir()
    if d is None:
        return None
    key = hashlib.sha256(f"{CACHE_FORMAT}|{path}|{mtime_ns}|{size}".encode()).hexdigest()[:16]
    return d / f"{Path(path).stem}-{key}.npy"


def load_cached_array(file: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The uint8 array of `shape` cached in `file`; None when it is missing, unreadable, partial or of another
    shape or dtype (the caller rebuilds it)."""
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception:  # missing, partial, corrupt: rebuild
        return None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != shape:
        return None
    return arr
