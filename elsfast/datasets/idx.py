"""The IDX format of MNIST and Fashion-MNIST: `read_idx`, finding the four files under a data root, loading a pair.

`find_mnist` / `find_fashion_mnist` look in the usual folders (`root/mnist/`, `root/`, torchvision's
`root/MNIST/raw/`; `root/fashion-mnist/`, `root/FashionMNIST/raw/`) for the image and label files, gzipped or
not; `load_idx_pair` reads one pair as uint8 `[N, 1, H, W]` images and int64 labels. This module imports numpy,
the standard library and `elsfast.datasets.base` only.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .base import not_found

__all__ = ["find_fashion_mnist", "find_mnist", "load_idx_pair", "read_idx"]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gzip(path: Path) -> BinaryIO:
    """Open ``path`` for reading, transparently un-gzipping when it starts with the gzip magic."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, which closes it
    head = f.read(2)
    f.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def read_idx(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not (detected from the content, not the name).

    Format: 4-byte magic ``0x00 0x00 TT NN`` (``TT`` = element type, 0x08 = uint8, also 0x09 int8,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64; ``NN`` = number of dimensions), then ``NN``
    big-endian int32 sizes, then the data, big-endian, C order.

    Args:
        path: the file.
        limit: read only the first ``limit`` entries along the first dimension.

    Returns:
        A writable native-byte-order array of shape ``[d0, d1, ...]`` (``[min(d0, limit), ...]``); uint8 for
        the MNIST files (``[N, 28, 28]`` images, ``[N]`` labels).

    Raises:
        ValueError: bad magic, unknown type code, truncated file or trailing bytes (message names the file).
    """
    path = Path(path)
    with _open_maybe_gzip(path) as f:
        try:
            magic = f.read(4)
        except (OSError, EOFError) as e:  # e.g. a corrupt gzip stream
            raise ValueError(f"{path}: cannot read IDX file: {e}") from e
        if len(magic) < 4:
            raise ValueError(f"{path}: not an IDX file: only {len(magic)} bytes long")
        if magic[0] != 0 or magic[1] != 0:
            raise ValueError(
                f"{path}: not an IDX file: bad magic number 0x{magic.hex()} "
                "(expected 0x0000TTNN, e.g. 0x00000803 for uint8 images or 0x00000801 for uint8 labels)"
            )
        code, ndim = magic[2], magic[3]
        if code not in _IDX_DTYPES:
            raise ValueError(f"{path}: unsupported IDX element type 0x{code:02x} (magic 0x{magic.hex()})")
        if ndim == 0:
            raise ValueError(f"{path}: IDX file declares 0 dimensions (magic 0x{magic.hex()})")
        raw_dims = f.read(4 * ndim)
        if len(raw_dims) != 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions declared, header cut short")
        dims = [int(d) for d in np.frombuffer(raw_dims, dtype=">i4")]
        if any(d < 0 for d in dims):
            raise ValueError(f"{path}: negative dimension in IDX header: {dims}")
        dtype = np.dtype(_IDX_DTYPES[code])
        n = dims[0] if limit is None else min(dims[0], max(int(limit), 0))
        want = n * math.prod(dims[1:]) * dtype.itemsize
        try:
            data = f.read(want)
            extra = f.read(1) if n == dims[0] else b""
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: cannot read IDX data: {e}") from e
    if len(data) != want:
        raise ValueError(f"{path}: truncated IDX file: dimensions {dims} need {want} bytes of data, found {len(data)}")
    if extra:
        raise ValueError(f"{path}: IDX file has trailing bytes after the {dims} {dtype.name} data")
    return np.frombuffer(data, dtype=dtype).reshape([n, *dims[1:]]).astype(dtype.newbyteorder("="))


_IDX_BASENAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_variants(base: str) -> list[str]:
    dotted = base.replace("-idx", ".idx")  # e.g. Kaggle's "train-images.idx3-ubyte"
    return [base + ".gz", base, dotted + ".gz", dotted]


def _find_idx_pair(
    display: str, split: str, root: Path, source: str, dirs: Sequence[Path], hint: str
) -> tuple[Path, Path]:
    img_base, lbl_base = _IDX_BASENAMES[split]
    for d in dirs:
        img = next((d / v for v in _idx_variants(img_base) if (d / v).is_file()), None)
        lbl = next((d / v for v in _idx_variants(lbl_base) if (d / v).is_file()), None)
        if img is not None and lbl is not None:
            return img, lbl
    expected = f"the IDX files {img_base}[.gz] and {lbl_base}[.gz]"
    raise not_found(display, split, root, source, dirs, expected, hint)


def _mnist_dirs(root: Path) -> list[Path]:
    return [root / "mnist", root, root / "MNIST" / "raw"]


def _fashion_dirs(root: Path) -> list[Path]:
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw"]


_MNIST_HINT = "MNIST: https://yann.lecun.com/exdb/mnist/ (torchvision's MNIST/raw/ layout is accepted too)."

_FASHION_HINT = "Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist (data/fashion/)."


def find_mnist(root: Path, source: str, split: str) -> tuple[Path, Path]:
    """The MNIST (images, labels) IDX files of `split` under `root` (DatasetNotFoundError naming where it looked)."""
    return _find_idx_pair("MNIST", split, root, source, _mnist_dirs(root), _MNIST_HINT)


def find_fashion_mnist(root: Path, source: str, split: str) -> tuple[Path, Path]:
    """The Fashion-MNIST (images, labels) IDX files of `split` under `root`."""
    return _find_idx_pair("Fashion-MNIST", split, root, source, _fashion_dirs(root), _FASHION_HINT)


def load_idx_pair(img_file: Path, lbl_file: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """An MNIST-like pair of IDX files -> (uint8 `[N, 1, H, W]`, int64 `[N]`, 10 classes)."""
    images, labels = read_idx(img_file, limit=limit), read_idx(lbl_file, limit=limit)
    if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(
            f"{img_file}, {lbl_file}: expected uint8 images [N, H, W] and uint8 labels [N], got "
            f"{images.dtype} {list(images.shape)} and {labels.dtype} {list(labels.shape)}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{img_file}: {len(images)} images but {lbl_file} has {len(labels)} labels")
    return images[:, None], labels.astype(np.int64), 10
