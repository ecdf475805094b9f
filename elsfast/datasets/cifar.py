"""CIFAR-10: the official python pickle batches and the JPEG-compressed npz copy, with its decoded cache.

`find_cifar` looks for the batches (preferred: the original, lossless pixels) or the JPEG npz under a data root;
`load_cifar` reads either as uint8 `[N, 3, 32, 32]`. The batches are read by an unpickler that resolves only the
globals a batch needs. Decoding the JPEG copy takes seconds, so the decoded array is cached in memory (keyed on
path, mtime and size; `clear_memory_cache` drops it) and on disk (`elsfast.datasets.cache`). This module imports
numpy, Pillow (lazily), the standard library, `elsfast.common` and `elsfast.datasets.base` / `.cache` only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import threading
from pathlib import Path

import numpy as np

from ..common.fileio import atomic_write, open_npz
from .base import not_found
from .cache import cache_file, load_cached_array

__all__ = ["clear_memory_cache", "find_cifar", "load_cifar"]


def _cifar_batch_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def find_cifar(root: Path, source: str, split: str) -> tuple[str, Path]:
    """Return ``("pickle", batch_dir)`` or ``("jpeg", npz_path)``."""
    batch_dirs = [root / "cifar10" / "cifar-10-batches-py", root / "cifar-10-batches-py", root / "cifar10"]
    names = _cifar_batch_names(split)
    for d in batch_dirs:
        if all((d / n).is_file() for n in names):
            return "pickle", d
    jpeg = root / "cifar10" / f"cifar10_{split}_jpeg.npz"
    if jpeg.is_file():
        return "jpeg", jpeg
    dirs = [*batch_dirs[:2], root / "cifar10"]
    expected = f"the CIFAR-10 python batches ({', '.join(names)}, from cifar-10-python.tar.gz) or {jpeg.name}"
    hint = "CIFAR-10: https://www.cs.toronto.edu/~kriz/cifar.html (extract cifar-10-python.tar.gz into root)."
    raise not_found("CIFAR-10", split, root, source, dirs, expected, hint)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a CIFAR-10 batch needs (numpy arrays, bytes), so a
    tampered batch file cannot run arbitrary code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
            ("copy_reg", "_reconstructor"),
            ("copyreg", "_reconstructor"),
            ("__builtin__", "object"),
            ("builtins", "object"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a CIFAR-10 batch")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module.removeprefix("numpy.core")  # avoid numpy 2's deprecation shim
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official CIFAR-10 batch -> (uint8 ``[n, 3, 32, 32]``, int64 ``[n]``)."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: cannot read CIFAR-10 batch: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: CIFAR-10 batch should hold a dict, got {type(d).__name__}")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR-10 batch lacks b'data' or b'labels' (keys: {sorted(map(str, d))})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != data.shape[:1]:
        raise ValueError(
            f"{path}: CIFAR-10 batch should hold uint8 data [n, 3072] and n labels, got "
            f"{data.dtype} {list(data.shape)} and {list(labels.shape)} labels"
        )
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_pickle(batch_dir: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels, have = [], [], 0
    for name in _cifar_batch_names(split):
        if limit is not None and have >= limit:
            break
        x, y = _read_cifar_batch(batch_dir / name)
        images.append(x)
        labels.append(y)
        have += len(x)
    x = np.concatenate(images) if images else np.zeros((0, 3, 32, 32), np.uint8)
    y = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    return x[:limit], y[:limit]


def _decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, n: int, where: str) -> np.ndarray:
    """Decode the first ``n`` concatenated JPEGs -> uint8 ``[n, 32, 32, 3]`` (HWC)."""
    from PIL import JpegImagePlugin

    buf = jpeg.tobytes()
    bounds = offsets.tolist()
    out = np.empty((n, 32, 32, 3), np.uint8)
    flat = out.reshape(n, 32 * 32 * 3)
    for i in range(n):
        try:
            # JpegImageFile directly (no format sniffing) and tobytes: ~25% faster than Image.open/asarray
            with JpegImagePlugin.JpegImageFile(io.BytesIO(buf[bounds[i] : bounds[i + 1]])) as im:
                if im.size != (32, 32):
                    raise ValueError(f"size {im.size[0]}x{im.size[1]}, expected 32x32")
                rgb = im if im.mode == "RGB" else im.convert("RGB")
                flat[i] = np.frombuffer(rgb.tobytes(), np.uint8)
        except Exception as e:  # PIL raises a variety of types for corrupt data
            raise ValueError(f"{where}: cannot decode JPEG image {i}: {e}") from e
    return out


def _read_jpeg_npz(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open_npz(path) as z:
        missing = {"jpeg", "offsets", "labels"} - set(z.files)
        if missing:
            raise ValueError(f"{path}: CIFAR-10 JPEG npz lacks keys {sorted(missing)} (has {z.files})")
        jpeg, offsets, labels = z["jpeg"], z["offsets"].astype(np.int64), z["labels"].astype(np.int64)
    n = len(offsets) - 1
    if n < 0 or labels.shape != (n,) or offsets[0] != 0 or offsets[-1] != len(jpeg) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{path}: inconsistent offsets/labels in CIFAR-10 JPEG npz")
    return jpeg, offsets, labels


_decoded_keys: set[tuple[str, int, int]] = set()

_decoded_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _decoded_cifar_jpeg(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All images of a CIFAR-10 JPEG npz, decoded: (read-only uint8 ``[N, 32, 32, 3]``, int64 ``[N]``).

    Cached in memory (this lru_cache, keyed on path + mtime + size) and on disk (see :mod:`elsfast.datasets.cache`).
    """
    jpeg, offsets, labels = _read_jpeg_npz(path)
    n = len(labels)
    file = cache_file(path, mtime_ns, size)
    arr = load_cached_array(file, (n, 32, 32, 3)) if file is not None else None
    if arr is None:
        arr = _decode_jpegs(jpeg, offsets, n, path)
        if file is not None:
            # elsfast's own cache folder: whatever is at the path is replaced; a read-only or full cache folder
            # only costs speed
            with contextlib.suppress(OSError):
                atomic_write(file, lambda f: np.save(f, arr, allow_pickle=False), replace="any")
    arr.setflags(write=False)
    labels.setflags(write=False)
    with _decoded_lock:
        _decoded_keys.add((path, mtime_ns, size))
    return arr, labels


def clear_memory_cache() -> None:
    """Drop the in-memory cache of decoded CIFAR-10 JPEG arrays (the disk cache is left alone)."""
    with _decoded_lock:
        _decoded_cifar_jpeg.cache_clear()
        _decoded_keys.clear()


def _load_cifar_jpeg(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 ``[N, 32, 32, 3]`` HWC, possibly read-only; int64 ``[N]``)."""
    spath = str(path.resolve())
    st = os.stat(spath)
    key = (spath, st.st_mtime_ns, st.st_size)
    if limit is not None and key not in _decoded_keys:
        # A small prefix is cheaper to decode than the whole set, unless a disk cache already holds it.
        jpeg, offsets, labels = _read_jpeg_npz(spath)
        n = len(labels)
        file = cache_file(*key)
        if limit < n and (file is None or not file.is_file()):
            return _decode_jpegs(jpeg, offsets, limit, spath), labels[:limit]
    arr, labels = _decoded_cifar_jpeg(*key)
    return arr[:limit], labels[:limit]


def load_cifar(where: tuple[str, Path], split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """`where` from `find_cifar` -> (uint8 `[N, 3, 32, 32]`, int64 `[N]`, 10 classes); arrays may be views."""
    kind, path = where
    if kind == "pickle":
        images, labels = _load_cifar_pickle(path, split, limit)
        return images, labels, 10
    hwc, labels = _load_cifar_jpeg(path, limit)
    return hwc.transpose(0, 3, 1, 2), labels, 10
