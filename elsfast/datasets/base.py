"""What every dataset format shares: the `Dataset` container, `DatasetNotFoundError`, the splits and the data root.

`resolve_root` finds the data root (`root=` or `$ELSFAST_DATA`); `not_found` and `no_root_error` build the
messages that name where a dataset was looked for and how to point elsfast at it. This module imports only numpy,
torch and the standard library; every other module of `elsfast.datasets` may import it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ENV_DATA", "SPLITS", "Dataset", "DatasetNotFoundError", "no_root_error", "not_found", "resolve_root"]

ENV_DATA = "ELSFAST_DATA"

SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A dataset's files are not where they were looked for.

    Subclasses both :class:`FileNotFoundError` and :class:`ValueError`, so ``except ValueError`` catches
    every kind of bad input to :func:`load`. The message names the directories searched, the file names
    expected, and how to point elsfast at the data (``root=`` or ``$ELSFAST_DATA``).
    """


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


def resolve_root(root: str | os.PathLike | None) -> tuple[Path | None, str]:
    """Return ``(root, where it came from)``; ``root`` is None when neither root= nor $ELSFAST_DATA is set."""
    if root is not None:
        return Path(os.fspath(root)).expanduser(), "root="
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser(), f"${ENV_DATA}"
    return None, ""


def not_found(
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


def no_root_error(name: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"Dataset {name!r} needs a data directory, but root=None and ${ENV_DATA} is not set. "
        f"Pass root=/path/to/data to load() or set {ENV_DATA}=/path/to/data (the directory holding "
        f"mnist/, fashion-mnist/, cifar10/, faces/). 'mnist-embedded' needs no data directory."
    )
