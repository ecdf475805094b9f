"""Image datasets for elsfast: MNIST, Fashion-MNIST, CIFAR-10, faces, an embedded MNIST subset, npz files
and image folders, all returned as one uint8 ``[N, C, H, W]`` tensor.

Quick start::

    from elsfast import datasets
    ds = datasets.load("mnist-embedded", pad_to=32)      # 2,000 MNIST digits, ships with the package
    ds = datasets.load("cifar10", root="/data")          # or set ELSFAST_DATA=/data
    ds = datasets.load("my_images.npz", as_float=True)   # any npz with an ``images`` array
    ds = datasets.load("photos/")                        # a folder of png/jpg/bmp, optionally per class
    x = datasets.to_float(ds.images)                     # uint8 -> float32 in [-1, 1]

Where the named datasets are looked for (``root`` is the ``root=`` argument, else ``$ELSFAST_DATA``):

==================  =================================================================================
``mnist``           ``root/mnist/``, ``root/``, ``root/MNIST/raw/`` (torchvision layout): the IDX files
                    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
                    ``t10k-labels-idx1-ubyte``, each gzipped (``.gz``) or not; the ``train-images.idx3-ubyte``
                    spelling is accepted too.
``fashion-mnist``   ``root/fashion-mnist/``, ``root/FashionMNIST/raw/``: same IDX file names as MNIST.
``cifar10``         the official python pickle batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``)
                    in ``root/cifar10/cifar-10-batches-py/``, ``root/cifar-10-batches-py/`` or
                    ``root/cifar10/``; else ``root/cifar10/cifar10_{train,test}_jpeg.npz`` (JPEG-compressed
                    copy: keys ``jpeg``, ``offsets``, ``labels``). When both exist the pickle batches (the
                    original, lossless pixels) win.
``faces``           ``root/faces/lfw_32x32.npz`` or ``root/lfw_32x32.npz`` (LFW, 32x32 grey; split
                    ``"train"`` only; returned as 1 channel).
``mnist-embedded``  the 2,000-image MNIST subset in ``elsfast/assets/mnist_embedded.npz``; needs no root.
==================  =================================================================================

Decoding the CIFAR-10 JPEG copy takes a few seconds, so the decoded uint8 array is cached in memory
(keyed on path, mtime and size) and on disk as ``.npy`` under ``$ELSFAST_CACHE`` (default
``~/.cache/elsfast``; set ``ELSFAST_CACHE=off`` to disable the disk cache).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import math
import os
import pickle
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..common.fileio import atomic_write, open_npz
from ..common.pixels import to_float

__all__ = [
    "EMBEDDED_MNIST_PATH",
    "ENV_CACHE",
    "ENV_DATA",
    "IMAGE_EXTENSIONS",
    "NAMED_DATASETS",
    "SPLITS",
    "Dataset",
    "DatasetNotFoundError",
    "available",
    "cache_dir",
    "clear_memory_cache",
    "load",
    "read_idx",
    "to_float",
]

ENV_DATA = "ELSFAST_DATA"
"""Environment variable naming the data root used when ``root=None``."""
ENV_CACHE = "ELSFAST_CACHE"
"""Environment variable naming the on-disk cache folder (``off``/``0``/``none``/empty disables it)."""

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
NAMED_DATASETS = ("mnist", "fashion-mnist", "cifar10", "faces", "mnist-embedded")
EMBEDDED_MNIST_PATH = Path(__file__).resolve().parents[1] / "assets" / "mnist_embedded.npz"

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "lfw": "faces",
    "mnist-embed": "mnist-embedded",
}
_NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "mnist-embedded": 10}


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A dataset's files are not where they were looked for.

    Subclasses both :class:`FileNotFoundError` and :class:`ValueError`, so ``except ValueError`` catches
    every kind of bad input to :func:`load`. The message names the directories searched, the file names
    expected, and how to point elsfast at the data (``root=`` or ``$ELSFAST_DATA``).
    """


# ----------------------------------------------------------------------------------------------------------
# The dataset container and the float conversion


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An in-memory image dataset.

    Attributes:
        images: ``torch.uint8`` tensor ``[N, C, H, W]`` with values 0..255 (or, when loaded with
            ``as_float=True``, ``torch.float32`` in ``[-1, 1]`` via ``u / 127.5 - 1``). Contiguous.
        labels: ``torch.int64`` tensor ``[N]`` of class indices, or ``None`` for unlabelled data.
        name: the dataset name (``"mnist"``, ...) or, for a path, the path as given.
        num_classes: number of classes (``labels.max() + 1`` for npz files, the number of class folders for
            an image folder), or ``None`` when unlabelled.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str
    num_classes: int | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of channels ``C``."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __repr__(self) -> str:
        def desc(t: torch.Tensor | None) -> str:
            if t is None:
                return "None"
            return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"

        return (
            f"Dataset(name={self.name!r}, images={desc(self.images)}, labels={desc(self.labels)}, "
            f"num_classes={self.num_classes})"
        )


# ----------------------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

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


# ----------------------------------------------------------------------------------------------------------
# Locating the named datasets


def _resolve_root(root: str | os.PathLike | None) -> tuple[Path | None, str]:
    """Return ``(root, where it came from)``; ``root`` is None when neither root= nor $ELSFAST_DATA is set."""
    if root is not None:
        return Path(os.fspath(root)).expanduser(), "root="
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser(), f"${ENV_DATA}"
    return None, ""


def _not_found(
    display: str, split: str, root: Path, source: str, dirs: Sequence[Path], expected: str, hint: str = ""
) -> DatasetNotFoundError:
    looked = ", ".join(str(d) for d in dirs)
    missing = "" if root.is_dir() else ", which does not exist"
    msg = (
        f"{display} ({split} split) not found. Looked in: {looked} "
        f"(data root {root} from {source}{missing}). "
        f"Expected {expected}. Pass root=/path/to/data to load() or set {ENV_DATA}=/path/to/data, "
        f"where that directory holds the dataset folders (mnist/, fashion-mnist/, cifar10/, faces/)."
    )
    if hint:
        msg += " " + hint
    return DatasetNotFoundError(msg)


def _no_root_error(name: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"Dataset {name!r} needs a data directory, but root=None and ${ENV_DATA} is not set. "
        f"Pass root=/path/to/data to load() or set {ENV_DATA}=/path/to/data (the directory holding "
        f"mnist/, fashion-mnist/, cifar10/, faces/). 'mnist-embedded' needs no data directory."
    )


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
    raise _not_found(display, split, root, source, dirs, expected, hint)


def _mnist_dirs(root: Path) -> list[Path]:
    return [root / "mnist", root, root / "MNIST" / "raw"]


def _fashion_dirs(root: Path) -> list[Path]:
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw"]


def _cifar_batch_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _find_cifar(root: Path, source: str, split: str) -> tuple[str, Path]:
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
    raise _not_found("CIFAR-10", split, root, source, dirs, expected, hint)


def _find_faces(root: Path, source: str, split: str) -> Path:
    dirs = [root / "faces", root]
    for d in dirs:
        if (d / "lfw_32x32.npz").is_file():
            return d / "lfw_32x32.npz"
    raise _not_found("faces (LFW 32x32)", split, root, source, dirs, "the file lfw_32x32.npz")


_MNIST_HINT = "MNIST: https://yann.lecun.com/exdb/mnist/ (torchvision's MNIST/raw/ layout is accepted too)."
_FASHION_HINT = "Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist (data/fashion/)."


def _locate(name: str, split: str, root: Path, source: str) -> object:
    """Find the files of named dataset ``name`` for its loader (raises DatasetNotFoundError)."""
    if name == "mnist":
        return _find_idx_pair("MNIST", split, root, source, _mnist_dirs(root), _MNIST_HINT)
    if name == "fashion-mnist":
        return _find_idx_pair("Fashion-MNIST", split, root, source, _fashion_dirs(root), _FASHION_HINT)
    if name == "cifar10":
        return _find_cifar(root, source, split)
    if name == "faces":
        return _find_faces(root, source, split)
    raise AssertionError(name)  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 loaders (pickle batches and the JPEG npz, with caches)


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


def cache_dir() -> Path | None:
    """The on-disk cache folder: ``$ELSFAST_CACHE``, else ``$XDG_CACHE_HOME/elsfast`` or
    ``~/.cache/elsfast``; ``None`` when ``ELSFAST_CACHE`` is ``off``, ``0``, ``none``, ``false`` or empty."""
    env = os.environ.get(ENV_CACHE)
    if env is not None:
        if env.strip().lower() in ("", "0", "off", "none", "false", "no"):
            return None
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "elsfast"


_CACHE_FORMAT = 1


def _cifar_cache_file(path: str, mtime_ns: int, size: int) -> Path | None:
    d = cache_dir()
    if d is None:
        return None
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{path}|{mtime_ns}|{size}".encode()).hexdigest()[:16]
    return d / f"{Path(path).stem}-{key}.npy"


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


def _try_load_cache(file: Path, n: int) -> np.ndarray | None:
    """Load a cached decode; anything unreadable or of the wrong shape/dtype is ignored (returns None)."""
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception:  # missing, partial, corrupt: rebuild
        return None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != (n, 32, 32, 3):
        return None
    return arr


def _write_cache_atomic(file: Path, arr: np.ndarray) -> None:
    """Write ``arr`` to ``file`` with the shared atomic writer (elsfast's own cache folder: whatever is at the
    path is replaced); errors are ignored, a read-only or full cache folder only costs speed."""
    with contextlib.suppress(OSError):
        atomic_write(file, lambda f: np.save(f, arr, allow_pickle=False), replace="any")


_decoded_keys: set[tuple[str, int, int]] = set()
_decoded_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _decoded_cifar_jpeg(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All images of a CIFAR-10 JPEG npz, decoded: (read-only uint8 ``[N, 32, 32, 3]``, int64 ``[N]``).

    Cached in memory (this lru_cache, keyed on path + mtime + size) and on disk (see :func:`cache_dir`).
    """
    jpeg, offsets, labels = _read_jpeg_npz(path)
    n = len(labels)
    file = _cifar_cache_file(path, mtime_ns, size)
    arr = _try_load_cache(file, n) if file is not None else None
    if arr is None:
        arr = _decode_jpegs(jpeg, offsets, n, path)
        if file is not None:
            _write_cache_atomic(file, arr)
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
        file = _cifar_cache_file(*key)
        if limit < n and (file is None or not file.is_file()):
            return _decode_jpegs(jpeg, offsets, limit, spath), labels[:limit]
    arr, labels = _decoded_cifar_jpeg(*key)
    return arr[:limit], labels[:limit]


# ----------------------------------------------------------------------------------------------------------
# Generic loaders: npz files and image folders


def _images_from_array(arr: np.ndarray, layout: str | None, where: str) -> np.ndarray:
    """Any supported image array -> uint8 ``[N, C, H, W]`` (see :func:`load` for the layout rule)."""
    if arr.dtype != np.uint8:
        if arr.dtype.kind in "iu" and arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{where}: integer images must lie in 0..255, got {arr.min()}..{arr.max()}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{where}: images must be uint8 (0..255), got {arr.dtype}")
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim != 4:
        raise ValueError(f"{where}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {list(arr.shape)}")
    if layout is not None:
        lay = layout.strip().upper().removeprefix("N")
        if lay not in ("HWC", "CHW"):
            raise ValueError(f"{where}: layout must be 'NHWC' or 'NCHW', got {layout!r}")
    else:
        a, b = arr.shape[1], arr.shape[3]
        if a <= 4 < b:
            lay = "CHW"
        elif b <= 4 < a or (a <= 4 and b <= 4):
            lay = "HWC"
        else:
            raise ValueError(
                f"{where}: cannot tell the channel axis of images with shape {list(arr.shape)}: "
                "neither axis 1 nor axis 3 has at most 4 entries; store a 'layout' key ('NHWC' or 'NCHW')"
            )
    return arr.transpose(0, 3, 1, 2) if lay == "HWC" else arr


def _load_npz(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    z = open_npz(path)
    with z:
        if not hasattr(z, "files"):
            raise ValueError(f"{path}: expected an .npz archive with an 'images' array")
        if "images" not in z.files:
            raise ValueError(f"{path}: npz has no 'images' array (keys: {z.files})")
        images = z["images"]
        labels = z["labels"] if "labels" in z.files else None
        layout = str(z["layout"]) if "layout" in z.files else None
    images = _images_from_array(images[:limit], layout, str(path))
    num_classes = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iub":
            raise ValueError(f"{path}: labels must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
        num_classes = int(labels.max()) + 1 if labels.size else 0
        labels = labels[:limit].astype(np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels, num_classes


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _images_under(d: Path) -> list[Path]:
    """Image files under ``d`` (recursively, hidden files/folders skipped), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if _is_image_file(Path(dirpath) / f)]
    return sorted(found, key=lambda p: p.relative_to(d).as_posix())


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F")


def _load_image_folder(path: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    from PIL import Image

    if (path / "train").is_dir() or (path / "test").is_dir():
        if not (path / split).is_dir():
            raise DatasetNotFoundError(f"{path} has train/test sub-folders but no {split}/ folder")
        path = path / split
    elif split != "train":
        raise ValueError(
            f"{path}: an image folder without train/ and test/ sub-folders is one split; "
            f"load it with split='train' (got split={split!r})"
        )
    top = sorted(p for p in path.iterdir() if _is_image_file(p))
    class_dirs = sorted(
        (p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and _images_under(p)),
        key=lambda p: p.name,
    )
    if class_dirs and top:
        raise ValueError(
            f"{path}: holds both image files ({top[0].name}, ...) and class folders "
            f"({class_dirs[0].name}/, ...); put every image in a class folder or none"
        )
    if class_dirs:
        files = [(f, c) for c, d in enumerate(class_dirs) for f in _images_under(d)]
    else:
        files = [(f, -1) for f in top]
    if not files:
        raise DatasetNotFoundError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    files = files[: None if limit is None else max(limit, 1)]  # read one image even for limit=0: its shape

    arrays: list[np.ndarray] = []
    ref: tuple[Path, tuple[int, int]] | None = None
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L") if im.mode in _GREY_MODES else im.convert("RGB")
                a = np.asarray(im)
        except Exception as e:
            raise ValueError(f"{f}: cannot read image: {e}") from e
        if ref is None:
            ref = (f, a.shape[:2])
        elif a.shape[:2] != ref[1]:
            raise ValueError(
                f"{f}: image size {a.shape[1]}x{a.shape[0]} (WxH) differs from {ref[1][1]}x{ref[1][0]} of "
                f"{ref[0]}; all images in a folder dataset must share one size"
            )
        arrays.append(a)
    if any(a.ndim == 3 for a in arrays):  # some colour: make every image RGB
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
        images = np.stack(arrays).transpose(0, 3, 1, 2)
    else:
        images = np.stack(arrays)[:, None]
    if class_dirs:
        return images[:limit], np.array([c for _, c in files], np.int64)[:limit], len(class_dirs)
    return images[:limit], None, None


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def _normalise_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def _pad(images: np.ndarray, pad_to: int, where: str) -> np.ndarray:
    n, c, h, w = images.shape
    for size in (h, w):
        if pad_to < size:
            raise ValueError(f"pad_to={pad_to} is smaller than the {h}x{w} images of {where}")
        if (pad_to - size) % 2:
            raise ValueError(f"pad_to={pad_to} cannot pad the {h}x{w} images of {where} symmetrically (odd difference)")
    if (h, w) == (pad_to, pad_to):
        return images
    out = np.zeros((n, c, pad_to, pad_to), np.uint8)
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    out[:, :, top : top + h, left : left + w] = images
    return out


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum} or None, got {value!r}")
    return int(value)


def _load_named(
    key: str, split: str, root: str | os.PathLike | None, limit: int | None
) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """Named dataset -> (uint8 ``[N, C, H, W]``, int64 ``[N]``, num_classes); arrays may be views."""
    if key == "mnist-embedded":
        if split != "train":
            raise ValueError("'mnist-embedded' has only split='train'")
        with np.load(EMBEDDED_MNIST_PATH, allow_pickle=False) as z:
            return z["images"][:limit, None], z["labels"][:limit].astype(np.int64), 10
    if key == "faces" and split != "train":
        raise ValueError("'faces' has only split='train'")
    root_path, source = _resolve_root(root)
    if root_path is None:
        raise _no_root_error(key)
    where = _locate(key, split, root_path, source)
    if key in ("mnist", "fashion-mnist"):
        img_file, lbl_file = where  # type: ignore[misc]
        images, labels = read_idx(img_file, limit=limit), read_idx(lbl_file, limit=limit)
        if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise ValueError(
                f"{img_file}, {lbl_file}: expected uint8 images [N, H, W] and uint8 labels [N], got "
                f"{images.dtype} {list(images.shape)} and {labels.dtype} {list(labels.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(f"{img_file}: {len(images)} images but {lbl_file} has {len(labels)} labels")
        return images[:, None], labels.astype(np.int64), 10
    if key == "cifar10":
        kind, path = where  # type: ignore[misc]
        if kind == "pickle":
            images, labels = _load_cifar_pickle(path, split, limit)
            return images, labels, 10
        hwc, labels = _load_cifar_jpeg(path, limit)
        return hwc.transpose(0, 3, 1, 2), labels, 10
    return _load_faces(where, limit)  # type: ignore[arg-type]


def _load_faces(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """LFW 32x32 npz (``images`` uint8 [N, 32, 32, 3] with R=G=B) -> one channel ``[N, 1, 32, 32]``."""
    with open_npz(path) as z:
        hwc = z["images"][:limit]
        labels = z["labels"][:limit].astype(np.int64)
        num_classes = len(z["identity_names"]) if "identity_names" in z.files else None
    if hwc.ndim != 4 or hwc.dtype != np.uint8 or hwc.shape[3] not in (1, 3):
        raise ValueError(f"{path}: expected uint8 images [N, H, W, 3], got {hwc.dtype} {list(hwc.shape)}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    if hwc.shape[3] == 1 or (np.array_equal(hwc[..., 0], hwc[..., 1]) and np.array_equal(hwc[..., 0], hwc[..., 2])):
        return hwc[:, None, :, :, 0], labels, num_classes
    luma = hwc.astype(np.uint32) @ np.array([299, 587, 114], np.uint32)  # not R=G=B after all: ITU-R 601
    return ((luma + 500) // 1000).astype(np.uint8)[:, None], labels, num_classes


def _load_path(raw: str, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """npz file or image folder -> (uint8 ``[N, C, H, W]``, int64 ``[N]`` or None, num_classes)."""
    looks_like_path = any(s in raw for s in ("/", os.sep)) or raw.lower().endswith(".npz")
    path = Path(raw).expanduser()
    if not path.exists():
        if looks_like_path:
            raise DatasetNotFoundError(f"No such dataset file or directory: {raw!r} (resolved to {path.resolve()})")
        raise ValueError(
            f"Unknown dataset {raw!r}. Known names: {', '.join(NAMED_DATASETS)}; "
            "or pass the path of an .npz file or of a folder of images."
        )
    if path.is_dir():
        return _load_image_folder(path, split, limit)
    if path.suffix.lower() == ".npz":
        if split != "train":
            raise ValueError(f"{raw}: an .npz file is one split; load it with split='train' (got {split!r})")
        return _load_npz(path, limit)
    raise ValueError(f"{raw}: unsupported dataset file; expected an .npz file or a folder of images")


def load(
    name: str | os.PathLike,
    split: str = "train",
    root: str | os.PathLike | None = None,
    *,
    pad_to: int | None = None,
    as_float: bool = False,
    limit: int | None = None,
) -> Dataset:
    """Load an image dataset into memory.

    Args:
        name: one of ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"faces"``, ``"mnist-embedded"``
            (case and ``_``/``-`` do not matter; aliases ``"cifar-10"``, ``"fmnist"``, ``"lfw"``), or a path:

            * a ``.npz`` file with an ``images`` array and an optional integer ``labels`` array ``[N]``.
              ``images`` may be ``[N, H, W]`` (one channel), ``[N, H, W, C]`` or ``[N, C, H, W]``. For 4-D
              arrays the channel axis is the one of axis 1 and axis 3 whose size is at most 4; when both are
              (images of at most 4x4 pixels) it is axis 3 (HWC); an optional string key ``layout``
              (``"NHWC"`` or ``"NCHW"``) overrides the rule. Values must be uint8 (or integers in 0..255).
              ``num_classes`` is ``labels.max() + 1``.
            * a directory of ``.png``/``.jpg``/``.jpeg``/``.bmp`` files: either flat (no labels) or one
              sub-folder per class, ImageFolder style (class index = position of the folder name in sorted
              order; folders holding no images are ignored; images are searched recursively inside a class
              folder and ordered by class, then by relative path). If the directory has ``train/`` or
              ``test/`` sub-folders, ``split`` picks one. Greyscale images give one channel; if any image is
              colour, all are converted to RGB. All images must share one size (else ``ValueError`` naming
              the offending file).

            A name from the list above always means the named dataset; write ``"./faces"`` for a folder.
        split: ``"train"`` or ``"test"``. ``faces``, ``mnist-embedded``, npz files and image folders without
            ``train/``/``test/`` sub-folders have only ``"train"``.
        root: data directory for the named datasets (see the module docstring for the layout); defaults to
            ``$ELSFAST_DATA``. Ignored for ``mnist-embedded`` and paths.
        pad_to: pad the images with zeros (uint8 0, i.e. black, pixel value -1 after :func:`to_float`)
            symmetrically to ``pad_to x pad_to``, e.g. ``pad_to=32`` turns 28x28 MNIST into 32x32 with a
            2-pixel border. Equal to the image size: no-op. Smaller, or an odd difference: ``ValueError``.
        as_float: return float32 images in ``[-1, 1]`` (``u / 127.5 - 1``) instead of uint8.
        limit: keep only the first ``limit`` images (in the dataset's own order).

    Returns:
        A :class:`Dataset`: ``images`` uint8 ``[N, C, H, W]`` (float32 if ``as_float``), ``labels`` int64
        ``[N]`` or ``None``. Shapes: MNIST/Fashion-MNIST ``[60000|10000, 1, 28, 28]``, CIFAR-10
        ``[50000|10000, 3, 32, 32]``, faces ``[13233, 1, 32, 32]``, mnist-embedded ``[2000, 1, 28, 28]``.

    Raises:
        DatasetNotFoundError: the files are missing (message lists the directories searched and the file
            names expected), or no root was given and ``$ELSFAST_DATA`` is unset. Also a ``ValueError``.
        ValueError: unknown name, bad split, bad ``pad_to``/``limit``, malformed files.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None:
        limit = _check_int(limit, "limit", 0)
    if pad_to is not None:
        pad_to = _check_int(pad_to, "pad_to", 1)

    raw = os.fspath(name)
    key = _normalise_name(raw)
    if key in NAMED_DATASETS:
        display = key
        images, labels, num_classes = _load_named(key, split, root, limit)
    else:
        display = raw
        images, labels, num_classes = _load_path(raw, split, limit)

    images = images[:limit]
    if labels is not None:
        labels = labels[:limit]
    if pad_to is not None:
        images = _pad(images, pad_to, display)
    tensor = torch.from_numpy(np.array(images, dtype=np.uint8, order="C", copy=True))
    if as_float:
        tensor = to_float(tensor)
    label_tensor = None if labels is None else torch.from_numpy(np.array(labels, dtype=np.int64, copy=True))
    return Dataset(images=tensor, labels=label_tensor, name=display, num_classes=num_classes)


def available(root: str | os.PathLike | None = None) -> dict[str, bool]:
    """Which named datasets can be loaded (their ``"train"`` split's files exist), without loading them.

    ``root`` defaults to ``$ELSFAST_DATA``; with neither, only ``"mnist-embedded"`` is available.
    Returns e.g. ``{"mnist": True, "fashion-mnist": True, "cifar10": False, "faces": True,
    "mnist-embedded": True}`` (keys in :data:`NAMED_DATASETS` order).
    """
    root_path, source = _resolve_root(root)
    out: dict[str, bool] = {}
    for name in NAMED_DATASETS:
        if name == "mnist-embedded":
            out[name] = EMBEDDED_MNIST_PATH.is_file()
            continue
        if root_path is None:
            out[name] = False
            continue
        try:
            _locate(name, "train", root_path, source)
            out[name] = True
        except DatasetNotFoundError:
            out[name] = False
    return out
