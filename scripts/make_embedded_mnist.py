#!/usr/bin/env python
"""Regenerate ``elsfast/assets/mnist_embedded.npz``: the first 200 training images of each MNIST digit.

Usage::

    python scripts/make_embedded_mnist.py --root /path/to/data     # or set ELSFAST_DATA
    python scripts/make_embedded_mnist.py --check                  # verify the committed file instead

``--root`` is a directory holding the standard MNIST IDX files (``train-images-idx3-ubyte[.gz]`` and
``train-labels-idx1-ubyte[.gz]``) either directly or in a ``mnist/`` sub-folder.

Selection: for each class c = 0..9, the 200 lowest training-set indices i with label c; the union of these
2,000 indices is stored in increasing original index order (so any prefix mixes all digits roughly
evenly). The npz holds ``images`` uint8 [2000, 28, 28], ``labels`` uint8 [2000] and ``source_index`` uint16
[2000] (the position in the 60,000-image MNIST training set). It is written as a deflate-compressed npz
(what ``np.savez_compressed`` writes) with fixed zip timestamps, so rerunning gives a byte-identical file.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from elsfast.datasets import read_idx  # noqa: E402

PER_CLASS = 200
DEFAULT_OUT = REPO / "elsfast" / "assets" / "mnist_embedded.npz"


def find_mnist(root: Path) -> tuple[Path, Path]:
    """The train image and label IDX files under ``root`` or ``root/mnist``."""
    for d in (root / "mnist", root, root / "MNIST" / "raw"):
        for suffix in (".gz", ""):
            img, lbl = d / f"train-images-idx3-ubyte{suffix}", d / f"train-labels-idx1-ubyte{suffix}"
            if img.is_file() and lbl.is_file():
                return img, lbl
    raise SystemExit(f"MNIST train IDX files not found in {root}/mnist or {root}")


def select(labels: np.ndarray, per_class: int = PER_CLASS) -> np.ndarray:
    """Original indices of the first ``per_class`` images of each class, in increasing order."""
    picks = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise SystemExit(f"class {c} has only {len(idx)} training images")
        picks.append(idx)
    return np.sort(np.concatenate(picks))


def build(root: Path) -> dict[str, np.ndarray]:
    img_file, lbl_file = find_mnist(root)
    images, labels = read_idx(img_file), read_idx(lbl_file)
    if images.shape != (60000, 28, 28) or labels.shape != (60000,):
        raise SystemExit(f"unexpected MNIST shapes {images.shape}, {labels.shape}")
    index = select(labels)
    return {
        "images": np.ascontiguousarray(images[index]),
        "labels": labels[index].astype(np.uint8),
        "source_index": index.astype(np.uint16),
    }


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of a compressed npz like ``np.savez_compressed`` writes, with fixed timestamps."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return buf.getvalue()


def digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each array's raw C-order bytes (independent of the zip container)."""
    return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in arrays.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=os.environ.get("ELSFAST_DATA") or REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)

    arrays = build(Path(args.root).expanduser())
    data = npz_bytes(arrays)
    for key, digest in digests(arrays).items():
        print(f"sha256({key}) = {digest}")
    print(f"sha256(file) = {hashlib.sha256(data).hexdigest()}  ({len(data)} bytes)")
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print(f"{args.out}: {'identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
