"""Dictionaries: where the keys and values of the core reduction come from, built chunk by chunk.

A dictionary holds training images (uint8 or float, never expanded to patches as a whole) and knows how to turn
the images `[start, stop)` into the keys and values of every group. Backends ask for one chunk at a time, so the
float32 patch dictionary is never materialised (SPEC section 5). Shape letters are those of `elsfast.reduce.api`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..common.pixels import to_float
from .patches import centre_pixels, extract_patches

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

    def pixel_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Where every entry's features and values come from: `(key_offsets (G, S, D), value_offsets (G, S, E))`,
        int64 indices into one image's flattened `C*H*W` pixels, -1 for a key feature outside the image under
        zero padding (its value is 0). Entry s of image n of group g has key `images[n].flatten()[key_offsets[g,
        s]]`. The fused kernels build the dictionary from these tables and the images, on the fly."""
        raise NotImplementedError

    def entry_ids_of(self, image: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The id of entry `position` (s, `0 <= s < S`) of image `image`: `image * S + s` (element-wise, any
        broadcastable shapes). With `image` a row of `images` the id is local, with an image id (`image_ids`) it is
        the dictionary's id. The only place that encodes an id; `decode_ids` is its inverse."""
        return image * self.entries_per_image + position

    def decode_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(image, position)` of the entry ids `ids` (`entry_ids_of`'s inverse), each of `ids`' shape; the id -1
        (no entry) decodes to image -1 and position S - 1."""
        S = self.entries_per_image
        return ids // S, ids % S

    def global_ids(self, local: torch.Tensor) -> torch.Tensor:
        """The dictionary's ids (image = `image_ids[n]`) of the local ids `local` (image = the row n of `images`,
        as the kernels number entries), of `local`'s shape and device; -1 (no entry) stays -1."""
        if self.image_ids is None:
            return local
        rows, position = self.decode_ids(local.clamp(min=0))
        ids = self.entry_ids_of(self.image_ids.to(local.device)[rows], position)
        return torch.where(local >= 0, ids, -1)

    def gather(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys `(*ids.shape, D)` and values `(*ids.shape, E)` of the entries with local ids `ids` (int64,
        `image * S + s` with `image` the row in `images`) of a one-group dictionary, in `dtype`."""
        if self.num_groups != 1:
            raise ValueError("gather needs a one-group dictionary: use group(g)")
        key_offsets, value_offsets = (t[0].to(self.images.device) for t in self.pixel_offsets())
        image, s = self.decode_ids(ids.to(self.images.device))
        image = image.unsqueeze(-1)
        pixels = self.images.reshape(self.num_images, -1)
        key_offsets = key_offsets[s]
        keys = to_float(pixels[image, key_offsets.clamp(min=0)], dtype) * (key_offsets >= 0)
        return keys, to_float(pixels[image, value_offsets[s]], dtype)

    def constant_features(self) -> torch.Tensor:
        """Bool `(D,)`: key features that hold the same value in every entry of this one-group dictionary (zero
        padding outside the image); they shift every distance equally and can be left out of a search index."""
        return torch.zeros(self.key_dim, dtype=torch.bool)

    def entry_ids(self, start: int, stop: int) -> torch.Tensor:
        """Ids `image_id * S + s` of the entries of `entries(start, stop)`, in its order: `((stop - start) * S,)`."""
        images = torch.arange(start, min(stop, self.num_images))
        if self.image_ids is not None:
            images = self.image_ids.cpu()[images]
        return self.entry_ids_of(images.unsqueeze(0), torch.arange(self.entries_per_image).unsqueeze(1)).flatten()


@dataclass(frozen=True)
class PatchDictionary(Dictionary):
    """LS/ELS: the P x P patches of every image at the positions of each group; the value is the centre pixel.

    `positions` `(G, S)` flat pixel indices (see `elsfast.reduce.patches.group_sets`).
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

    def sources(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the entries `ids` `(G, M)` (group g's ids in row g) come from: `(image, y, x)`, each `(G, M)` on
        `ids`' device, the image of the id (`decode_ids`) and the pixel its patch is centred on."""
        image, position = self.decode_ids(ids)
        centre = self.positions.to(ids.device).gather(1, position)
        W = self.images.shape[3]
        return image, centre // W, centre % W

    def select_groups(self, groups: list[int]) -> PatchDictionary:
        return replace(self, positions=self.positions[groups])

    def _window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For each group g and position s, the flat pixel index of every patch feature `(G, S, P*P)` (in the
        (row, column) order of `entries`) and whether it lies inside the image `(G, S, P*P)`."""
        H, W = self.images.shape[2:]
        r = self.patch_size // 2
        pos = self.positions.cpu()
        d = torch.arange(-r, r + 1)
        ys = (pos // W)[..., None, None] + d.view(-1, 1)  # (G, S, P, 1)
        xs = (pos % W)[..., None, None] + d.view(1, -1)  # (G, S, 1, P)
        inside = ((ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)).flatten(2)
        if self.padding == "circular":
            ys, xs, inside = ys % H, xs % W, torch.ones_like(inside)
        flat = (ys.clamp(0, H - 1) * W + xs.clamp(0, W - 1)).flatten(2)
        return flat, inside

    def pixel_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        C, H, W = self.images.shape[1:]
        channel = torch.arange(C).view(C, 1) * (H * W)
        flat, inside = self._window()  # (G, S, P*P)
        keys = torch.where(inside.unsqueeze(2), flat.unsqueeze(2) + channel, -1).flatten(2)  # (G, S, C*P*P)
        values = self.positions.cpu().unsqueeze(-1) + channel.view(1, 1, C)  # (G, S, C)
        return keys, values

    def constant_features(self) -> torch.Tensor:
        if self.num_groups != 1:
            raise ValueError("constant_features needs a one-group dictionary: use group(g)")
        inside = self._window()[1][0]
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

    def pixel_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        C, H, W = self.images.shape[1:]
        if not self.shifts:
            offsets = torch.arange(C * H * W).view(1, 1, -1)
            return offsets, offsets
        # translate s = (u, v) of an image is the window at (u, v) of its circular extension: pixel (c, y, x) of
        # the entry is pixel (c, (y + u) % H, (x + v) % W) of the image
        shift = torch.arange(H * W)
        ys = ((shift // W).view(-1, 1) + torch.arange(H)) % H  # (S, H)
        xs = ((shift % W).view(-1, 1) + torch.arange(W)) % W  # (S, W)
        flat = (ys.unsqueeze(-1) * W + xs.unsqueeze(-2)).flatten(1)  # (S, H*W)
        offsets = (torch.arange(C).view(C, 1) * (H * W) + flat.unsqueeze(1)).flatten(1).unsqueeze(0)  # (1, S, C*H*W)
        return offsets, offsets
