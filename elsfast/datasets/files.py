"""Datasets given by path: an `.npz` file with an `images` array, or a folder of image files (flat or one folder
per class).

`load_npz` and `load_image_folder` return uint8 `[N, C, H, W]`, int64 labels or None, and the number of classes
(the layout rules are documented in `elsfast.datasets.load`). This module imports numpy, Pillow (lazily), the
standard library, `elsfast.common.fileio` and `elsfast.datasets.base` only.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..common.fileio import open_npz
from .base import DatasetNotFoundError

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder", "load_npz"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


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


def load_npz(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray | None, int | None]:
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


def load_image_folder(path: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray | None, int | None]:
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
