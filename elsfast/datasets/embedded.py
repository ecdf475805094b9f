"""The 2,000-image MNIST subset shipped with the package (`elsfast/assets/mnist_embedded.npz`; needs no data root).

`EMBEDDED_MNIST_PATH` is the file (see `elsfast/assets/MNIST_EMBEDDED.md` for how it was made), `load_embedded`
reads it. This module imports numpy and the standard library only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["EMBEDDED_MNIST_PATH", "load_embedded"]

EMBEDDED_MNIST_PATH = Path(__file__).resolve().parents[1] / "assets" / "mnist_embedded.npz"


def load_embedded(split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """The embedded subset -> (uint8 `[N, 1, 28, 28]`, int64 `[N]`, 10 classes); split "train" only."""
    if split != "train":
        raise ValueError("'mnist-embedded' has only split='train'")
    with np.load(EMBEDDED_MNIST_PATH, allow_pickle=False) as z:
        return z["images"][:limit, None], z["labels"][:limit].astype(np.int64), 10
