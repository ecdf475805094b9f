"""The faces dataset: LFW at 32x32 grey (`lfw_32x32.npz`), returned as one channel.

`find_faces` looks for the npz under a data root, `load_faces` reads it. This module imports numpy,
`elsfast.common.fileio` and `elsfast.datasets.base` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common.fileio import open_npz
from .base import not_found

__all__ = ["find_faces", "load_faces"]


def find_faces(root: Path, source: str, split: str) -> Path:
    dirs = [root / "faces", root]
    for d in dirs:
        if (d / "lfw_32x32.npz").is_file():
            return d / "lfw_32x32.npz"
    raise not_found("faces (LFW 32x32)", split, root, source, dirs, "the file lfw_32x32.npz")


def load_faces(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, int]:
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
