"""Patch geometry: padding modes, border classes and patch extraction (SPEC section 2).

Positions are flat pixel indices `y * W + x`. A *group set* is a `(G, S)` integer tensor of positions: G groups,
each a set of S pixel positions whose pixels share one dictionary (the patches of every training image at
those S positions). Groups of one set have equal sizes so a backend can batch them.

- LS: every pixel is its own group: one set of shape (H*W, 1).
- ELS, circular padding: one group with every position: (1, H*W).
- ELS, zero padding ("boundary-broken"): along an axis of length L with r = P // 2, position i has border class
  i if i < r or i > L - 1 - r, else the class "interior"; a pixel's group is the pair of its row and column
  classes. Groups are bucketed by size, giving up to three sets: interior x interior, edges, corners.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

__all__ = ["PADDINGS", "border_classes", "centre_pixels", "extract_patches", "group_sets", "pad_images"]

PADDINGS = ("zeros", "circular")


def pad_images(images: torch.Tensor, r: int, padding: str) -> torch.Tensor:
    """Pad float images `[n, C, H, W]` by `r` pixels on each side -> `[n, C, H + 2r, W + 2r]`.

    `zeros` pads with the value 0 (mid-grey in [-1, 1] units, as a zero-padded convolution sees it);
    `circular` wraps around, for any r (also r larger than the image).
    """
    if r == 0:
        return images
    if padding == "zeros":
        return F.pad(images, (r, r, r, r))
    H, W = images.shape[-2:]
    rows = torch.arange(-r, H + r, device=images.device) % H
    cols = torch.arange(-r, W + r, device=images.device) % W
    return images[:, :, rows][:, :, :, cols]


def border_classes(length: int, r: int) -> list[int]:
    """Border class of each position of an axis of `length`: the position itself near a border, -1 inside."""
    return [i if (i < r or i > length - 1 - r) else -1 for i in range(length)]


def group_sets(H: int, W: int, patch_size: int, padding: str, machine: str) -> list[torch.Tensor]:
    """Partition the H*W pixels into groups sharing a dictionary; return the group sets, each `(G, S)` int64.

    `machine` is "ls" (one group per pixel) or "els" (translation-equivariant; with zero padding the groups are
    the border classes of SPEC section 2).
    """
    if machine == "ls":
        return [torch.arange(H * W).view(H * W, 1)]
    if padding == "circular":
        return [torch.arange(H * W).view(1, H * W)]
    r = patch_size // 2
    rows, cols = border_classes(H, r), border_classes(W, r)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for y in range(H):
        for x in range(W):
            groups[(rows[y], cols[x])].append(y * W + x)
    by_size: dict[int, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        by_size[len(members)].append(members)
    return [torch.tensor(sets, dtype=torch.int64) for _, sets in sorted(by_size.items(), reverse=True)]


def extract_patches(images: torch.Tensor, patch_size: int, padding: str, positions: torch.Tensor) -> torch.Tensor:
    """Patches of float images `[n, C, H, W]` centred at `positions` `(G, S)` -> `[G, S, n, D]`, D = C*P*P.

    The feature order within a patch is (channel, row, column). Only the requested patches are copied; the
    full `[n, H, W, D]` patch tensor is never formed.
    """
    n, C, _H, W = images.shape
    P = patch_size
    padded = pad_images(images, P // 2, padding)
    # windows[y, x, i] is the P x P window of image i whose top-left corner is padded pixel (y, x), i.e. the patch
    # centred at pixel (y, x) of the unpadded image.
    windows = padded.unfold(2, P, 1).unfold(3, P, 1).permute(2, 3, 0, 1, 4, 5)
    pos = positions.to(images.device)
    return windows[pos // W, pos % W].reshape(*positions.shape, n, C * P * P)


def centre_pixels(images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pixels of `[n, C, H, W]` at `positions` `(G, S)` -> `[G, S, n, C]`."""
    n, C = images.shape[:2]
    flat = images.reshape(n, C, -1)[:, :, positions.to(images.device)]  # [n, C, G, S]
    return flat.permute(2, 3, 0, 1)
