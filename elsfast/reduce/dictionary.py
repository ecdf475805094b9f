"""Dictionaries: where the keys and values of the core reduction come from, built chunk by chunk.

A dictionary holds training images (uint8 or float, never expanded to patches as a whole) and knows how to turn
the images `[start, stop)` into the keys and values of every group. Backends ask for one chunk at a time, so the
float32 patch dictionary is never materialised (SPEC section 5). Shape letters are those of `elsfast.reduce.api`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..patches import centre_pixels, extract_patches
from ..pixels import to_float

__all__ = ["Dictionary", "ImageDictionary", "PatchDictionary"]


@dataclass(frozen=True)
class Dictionary:
    """Base class. `images` `[N, C, H, W]` are the training images that contribute to the dictionary;
    `image_ids` `[N]` (default 0..N-1) names them in provenance, e.g. their indices in the full training set.

    Subclasses define `num_groups` (G), `entries_per_image` (S), `key_dim` (D), `value_dim` (E) and `entries`.
    """

    images: torch.Tensor
    image_ids: torch.Tensor | None = field(default=None, kw_only=True)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> int:
        """Entries per group: N * S."""
        return self.num_images * self.entries_per_image

    def bytes_per_image(self, itemsize: int) -> int:
        """Working memory one training image costs inside a chunk (keys, values, norms and the copies made
        while building them), in bytes."""
        per_entry = self.num_groups * self.entries_per_image * (2 * self.key_dim + self.value_dim + 1)
        return itemsize * per_entry

    def entries(self, start: int, stop: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys `(G, (stop - start) * S, D)` and values `(G, (stop - start) * S, E)` of images `[start, stop)`.

        Entries are ordered entry-major: entry s of image start + i sits at index s * (stop - start) + i."""
        raise NotImplementedError

    def select_groups(self, groups: list[int]) -> Dictionary:
        """The dictionary of the groups `groups` only (same images and ids)."""
        raise NotImplementedError

    def group(self, g: int) -> Dictionary:
        """The one-group dictionary of group `g`."""
        return self.select_groups([g])

    def gather(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys `(*ids.shape, D)` and values `(*ids.shape, E)` of the entries with local ids `ids` (int64,
        `image * S + s` with `image` the row in `images`) of a one-group dictionary, in `dtype`."""
        raise NotImplementedError

    def constant_features(self) -> torch.Tensor:
        """Bool `(D,)`: key features that hold the same value in every entry of this one-group dictionary (zero
        padding outside the image); they shift every distance equally and can be left out of a search index."""
        return torch.zeros(self.key_dim, dtype=torch.bool)

    def entry_ids(self, start: int, stop: int) -> torch.Tensor:
        """Ids `image_id * S + s` of the entries of `entries(start, stop)`, in its order: `((stop - start) * S,)`."""
        images = torch.arange(start, min(stop, self.num_images))
        if self.image_ids is not None:
            images = self.image_ids.cpu()[images]
        S = self.entries_per_image
        return (torch.arange(S).unsqueeze(1) + images.unsqueeze(0) * S).flatten()


@dataclass(frozen=True)
class PatchDictionary(Dictionary):
    """LS/ELS: the P x P patches of every image at the positions of each group; the value is the centre pixel.

    `positions` `(G, S)` flat pixel indices (see `elsfast.patches.group_sets`).
    """

    patch_size: int
    padding: str
    positions: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.positions.shape[0]

    @property
    def entries_per_image(self) -> int:
        return self.positions.shape[1]

    @property
    def key_dim(self) -> int:
        return self.images.shape[1] * self.patch_size**2

    @property
    def value_dim(self) -> int:
        return self.images.shape[1]

    def entries(self, start: int, stop: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = to_float(self.images[start:stop], dtype)
        G = self.num_groups
        keys = extract_patches(chunk, self.patch_size, self.padding, self.positions).reshape(G, -1, self.key_dim)
        values = centre_pixels(chunk, self.positions).reshape(G, -1, self.value_dim)
        return keys, values

    def select_groups(self, groups: list[int]) -> PatchDictionary:
        return replace(self, positions=self.positions[groups])

    def _window(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each position s of the (one) group, the flat pixel index of every patch feature `(S, P*P)`, whether
        it lies inside the image `(S, P*P)`, and the feature offsets' (row, column) order matches `entries`."""
        H, W = self.images.shape[2:]
        r = self.patch_size // 2
        pos = self.positions[0].cpu()
        d = torch.arange(-r, r + 1)
        ys = (pos // W).view(-1, 1, 1) + d.view(1, -1, 1)  # (S, P, 1)
        xs = (pos % W).view(-1, 1, 1) + d.view(1, 1, -1)  # (S, 1, P)
        inside = ((ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)).reshape(len(pos), -1)
        if self.padding == "circular":
            ys, xs, inside = ys % H, xs % W, torch.ones_like(inside)
        flat = (ys.clamp(0, H - 1) * W + xs.clamp(0, W - 1)).reshape(len(pos), -1)
        return flat, inside, pos

    def gather(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_groups != 1:
            raise ValueError("gather needs a one-group dictionary: use group(g)")
        n, C = self.images.shape[:2]
        flat, inside, pos = self._window()
        device = self.images.device
        ids = ids.to(device)
        S = self.entries_per_image
        image, s = ids // S, (ids % S).cpu()
        pixels = self.images.reshape(n, C, -1)
        feat = flat[s].to(device)  # (*ids, P*P)
        keys = pixels[image.unsqueeze(-1).unsqueeze(-1), torch.arange(C, device=device).view(C, 1), feat.unsqueeze(-2)]
        keys = to_float(keys, dtype) * inside[s].to(device, dtype).unsqueeze(-2)  # (*ids, C, P*P)
        values = to_float(
            pixels[image.unsqueeze(-1), torch.arange(C, device=device), pos[s].to(device).unsqueeze(-1)], dtype
        )
        return keys.flatten(-2), values

    def constant_features(self) -> torch.Tensor:
        _, inside, _ = self._window()
        if not (inside == inside[:1]).all():
            raise ValueError("the positions of this group have different borders; it is not a border class")
        return (~inside[0]).repeat(self.images.shape[1])


@dataclass(frozen=True)
class ImageDictionary(Dictionary):
    """IS (`shifts=False`): whole images, value = the image. ES (`shifts=True`): every circular translate of every
    image (H*W entries per image), value = the translated image. G = 1, D = E = C*H*W."""

    shifts: bool = False

    num_groups = 1

    @property
    def entries_per_image(self) -> int:
        return self.images.shape[2] * self.images.shape[3] if self.shifts else 1

    @property
    def key_dim(self) -> int:
        return math.prod(self.images.shape[1:])

    @property
    def value_dim(self) -> int:
        return self.key_dim

    def bytes_per_image(self, itemsize: int) -> int:
        # keys double as values, plus one copy while building the translates
        return itemsize * self.entries_per_image * (2 * self.key_dim + 1)

    def entries(self, start: int, stop: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = to_float(self.images[start:stop], dtype)
        n, C, H, W = chunk.shape
        if not self.shifts:
            keys = chunk.reshape(1, n, C * H * W)
            return keys, keys
        # The H x W windows of the circularly extended image are its H*W circular translates.
        ext = torch.cat([chunk, chunk[:, :, : H - 1]], dim=2)
        ext = torch.cat([ext, ext[:, :, :, : W - 1]], dim=3)  # [n, C, 2H - 1, 2W - 1]
        windows = ext.unfold(2, H, 1).unfold(3, W, 1)  # [n, C, H, W, H, W]
        keys = windows.permute(2, 3, 0, 1, 4, 5).reshape(1, H * W * n, C * H * W)
        return keys, keys

    def select_groups(self, groups: list[int]) -> ImageDictionary:
        if list(groups) != [0]:
            raise IndexError(f"an image dictionary has one group (0), got groups {groups}")
        return self

    def gather(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        n, C, H, W = self.images.shape
        ids = ids.to(self.images.device)
        if not self.shifts:
            keys = to_float(self.images.reshape(n, -1)[ids], dtype)
            return keys, keys
        S = H * W
        image, shift = ids // S, ids % S
        # translate s = (u, v) of image i is the window at (u, v) of the circular extension: pixel (y, x) of the
        # entry is pixel ((y + u) % H, (x + v) % W) of the image
        ys = (shift // W).unsqueeze(-1) + torch.arange(H, device=ids.device)  # (*ids, H)
        xs = (shift % W).unsqueeze(-1) + torch.arange(W, device=ids.device)  # (*ids, W)
        flat = (ys % H).unsqueeze(-1) * W + (xs % W).unsqueeze(-2)  # (*ids, H, W)
        pixels = self.images.reshape(n, C, H * W)
        keys = pixels[
            image.view(*ids.shape, 1, 1), torch.arange(C, device=ids.device).view(C, 1), flat.flatten(-2).unsqueeze(-2)
        ]
        keys = to_float(keys, dtype).flatten(-2)
        return keys, keys
