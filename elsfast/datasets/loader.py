"""The entry points of `elsfast.datasets`: `load` (a named dataset or a path) and `available`.

It holds the dataset names and their aliases, dispatches a name to its format module (`idx`, `cifar`, `faces`,
`embedded`) and a path to `files`, and applies what every format shares (`limit`, `pad_to`, `as_float`). This
module may import every other module of `elsfast.datasets` and `elsfast.common`; none of them imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..common.pixels import to_float
from .base import SPLITS, Dataset, DatasetNotFoundError, no_root_error, resolve_root
from .cifar import find_cifar, load_cifar
from .embedded import EMBEDDED_MNIST_PATH, load_embedded
from .faces import find_faces, load_faces
from .files import load_image_folder, load_npz
from .idx import find_fashion_mnist, find_mnist, load_idx_pair

__all__ = ["NAMED_DATASETS", "available", "load"]

NAMED_DATASETS = ("mnist", "fashion-mnist", "cifar10", "faces", "mnist-embedded")

_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "lfw": "faces",
    "mnist-embed": "mnist-embedded",
}


def _locate(name: str, split: str, root: Path, source: str) -> object:
    """Find the files of named dataset ``name`` for its loader (raises DatasetNotFoundError)."""
    if name == "mnist":
        return find_mnist(root, source, split)
    if name == "fashion-mnist":
        return find_fashion_mnist(root, source, split)
    if name == "cifar10":
        return find_cifar(root, source, split)
    if name == "faces":
        return find_faces(root, source, split)
    raise AssertionError(name)  # pragma: no cover


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
        return load_embedded(split, limit)
    if key == "faces" and split != "train":
        raise ValueError("'faces' has only split='train'")
    root_path, source = resolve_root(root)
    if root_path is None:
        raise no_root_error(key)
    where = _locate(key, split, root_path, source)
    if key in ("mnist", "fashion-mnist"):
        return load_idx_pair(*where, limit)  # type: ignore[misc]
    if key == "cifar10":
        return load_cifar(where, split, limit)  # type: ignore[arg-type]
    return load_faces(where, limit)  # type: ignore[arg-type]


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
        return load_image_folder(path, split, limit)
    if path.suffix.lower() == ".npz":
        if split != "train":
            raise ValueError(f"{raw}: an .npz file is one split; load it with split='train' (got {split!r})")
        return load_npz(path, limit)
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
        root: data directory for the named datasets (see the ``elsfast.datasets`` docstring for the layout);
            defaults to ``$ELSFAST_DATA``. Ignored for ``mnist-embedded`` and paths.
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
    root_path, source = resolve_root(root)
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
