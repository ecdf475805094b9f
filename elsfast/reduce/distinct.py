"""Distinct entries of a one-group dictionary and how often each occurs, and the content hashes that name them.

Flat backgrounds repeat one patch thousands of times (MNIST: 6 entries per distinct key at P = 3, 3 at P = 5,
1.8 at P = 7). Both the top-k backend (a top-k over distinct keys weighted by their counts can be certified where
one over raw entries never could) and the dedup backend (the exact softmax over distinct keys with log-count
biases) work on them. Keys are in index units: `u = (k + offset) * scale` (uint8 training images: the pixel values
0..255 exactly, scale 127.5, offset 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dictionary import Dictionary, ImageDictionary, PatchDictionary

__all__ = ["DistinctEntries", "describe", "distinct_entries", "resolve_storage", "to_units"]


def to_units(keys: torch.Tensor, features: torch.Tensor, offset: float, scale: float) -> torch.Tensor:
    """Keys or scaled queries `(..., D)` in [-1, 1] units -> the indexed features in index units, float64."""
    return (keys[..., features].double() + offset) * scale


def describe(dg: Dictionary) -> bytes:
    """What identifies a one-group dictionary's entries, apart from its images."""
    if isinstance(dg, PatchDictionary):
        return repr(("patch", dg.patch_size, dg.padding)).encode() + dg.positions.cpu().numpy().tobytes()
    if isinstance(dg, ImageDictionary):
        return repr(("image", dg.shifts)).encode()
    raise TypeError(f"no distinct entries for {type(dg).__name__}")


def resolve_storage(storage: str, kind: str, images: torch.Tensor) -> str:
    if storage == "auto":
        return "uint8" if images.dtype == torch.uint8 else "float32"
    if storage == "uint8" and images.dtype != torch.uint8:
        raise ValueError("storage='uint8' stores pixel values exactly and needs uint8 training images")
    return storage


def _image_major(keys: torch.Tensor, n_images: int) -> torch.Tensor:
    """Chunk keys `(1, S * n, D)` in entry-major order -> `(n * S, D)` with row `i * S + s` (the entry ids)."""
    D = keys.shape[-1]
    return keys[0].view(-1, n_images, D).transpose(0, 1).reshape(-1, D)


@dataclass
class DistinctEntries:
    """The distinct keys of a one-group dictionary and how often each occurs (flat backgrounds repeat one patch
    thousands of times; a top-k over distinct keys weighted by their counts is exact where a top-k over raw
    entries could never be certified). `keys` `(U, Dv)` in index units (uint8 for uint8 storage, float32
    otherwise), `rep_ids` `(U,)` one entry id per key (the first), `counts` `(U,)` float64; `total` entries."""

    keys: torch.Tensor
    rep_ids: torch.Tensor
    counts: torch.Tensor
    features: torch.Tensor
    storage: str
    scale: float
    offset: float
    total: int

    def unit_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.keys[start:stop].float()

    def to_units(self, keys: torch.Tensor) -> torch.Tensor:
        return to_units(keys, self.features, self.offset, self.scale)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 64-bit finaliser (a bijection of int64, wrapping arithmetic) on a fresh int64 tensor."""
    for shift, multiplier in ((33, -49064778989728563), (33, -4265267296055464877), (33, None)):
        z ^= (z >> shift) & ((1 << (64 - shift)) - 1)  # logical shift: torch's >> extends the sign
        if multiplier is not None:
            z *= multiplier
    return z


def _row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash `(n,)` of each row's bytes `(n, ...)`: the bytes as 64-bit words (zero-filled to whole
    words), each mixed by a bijection, then weighted by fixed random odd numbers and summed (wrapping). Equal rows
    hash equal; callers verify the converse."""
    data = rows.reshape(rows.shape[0], -1).view(torch.uint8)
    width = -(-data.shape[1] // 8) * 8
    if width != data.shape[1]:
        data = torch.nn.functional.pad(data, (0, width - data.shape[1]))
    words = data.view(torch.int64)
    weights = torch.randint(-(2**62), 2**62, (words.shape[1],), generator=torch.Generator().manual_seed(1234)) | 1
    return (_mix64(words.clone()) * weights).sum(1)


def distinct_entries(dg: Dictionary, storage: str, *, memory_budget: int = 512 << 20) -> DistinctEntries:
    """Every entry of the one-group dictionary `dg` in index units, deduplicated (hash, then verified exactly)."""
    storage = resolve_storage(storage, "flat", dg.images)
    features = (~dg.constant_features()).nonzero().flatten()
    Dv, n, S = len(features), dg.size, dg.entries_per_image
    scale, offset = (127.5, 1.0) if storage == "uint8" else (1.0, 0.0)
    dtype = torch.uint8 if storage == "uint8" else torch.float32
    keys = torch.empty(n, Dv, dtype=dtype)
    images_per_chunk = max(1, min(dg.num_images, (memory_budget // 4) // max(1, S * dg.key_dim * 4 * 3)))
    if isinstance(dg, PatchDictionary) and dg.images.dtype == dtype:
        # the stored pixels themselves (uint8: exactly the index units), one gather per chunk of images
        offsets = dg.pixel_offsets()[0][0][:, features].flatten()  # (S * Dv,), inside the image: not constant
        pixels = dg.images.cpu().reshape(dg.num_images, -1)
        for start in range(0, dg.num_images, images_per_chunk):
            stop = min(dg.num_images, start + images_per_chunk)
            keys[start * S : stop * S] = pixels[start:stop].index_select(1, offsets).view(-1, Dv)
    else:
        for start in range(0, dg.num_images, images_per_chunk):
            stop = min(dg.num_images, start + images_per_chunk)
            chunk, _ = dg.entries(start, stop, torch.float32)
            units = (_image_major(chunk.cpu(), stop - start)[:, features] + offset) * scale
            keys[start * S : stop * S] = units.round_() if storage == "uint8" else units
    # hash every row to an int64, group equal hashes, then check that the rows of a group really are equal
    step = max(1, (1 << 24) // max(1, Dv))
    hashes = torch.cat([_row_hashes(keys[i : i + step]) for i in range(0, n, step)])
    first = lambda inverse, u: torch.full((u,), n).scatter_reduce_(0, inverse, torch.arange(n), "amin")  # noqa: E731
    _, inverse, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    rep = first(inverse, len(counts))
    same = all(torch.equal(keys[i : i + step], keys[rep[inverse[i : i + step]]]) for i in range(0, n, step))
    if not same:  # a hash collision (astronomically rare): exact row-wise unique
        _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
        rep = first(inverse, len(counts))
    return DistinctEntries(keys[rep], rep, counts.double(), features, storage, scale, offset, n)
