"""Per-image agreement between two batches of images (SPEC section 3).

Every function takes two tensors of the same shape `[n, ...]` (typically `[n, C, H, W]`), flattens each image
over all its remaining axes (channels and pixels together) and returns one float64 value per image pair `[n]`:

- `pearson_r(a, b)`: Pearson correlation. Each image is mean-centred and L2-normalised over all its pixels and
  channels, then the two are dotted. **This is the number the paper (and its code) calls "r^2".**
- `r_squared(pred, ref)`: coefficient of determination of `pred` as a prediction of `ref`,
  `1 - sum((ref - pred)^2) / sum((ref - mean(ref))^2)`. Not symmetric; at most 1, unbounded below.
- `cosine_similarity(a, b)`: the uncentred cosine `<a, b> / (|a| |b|)` (used to calibrate P(t) on eps).

Degenerate images give NaN rather than a made-up number: a constant image (zero variance) in `pearson_r` or as
`ref` in `r_squared`, and an all-zero image in `cosine_similarity`.
"""

from __future__ import annotations

import torch

__all__ = ["cosine_similarity", "pearson_r", "r_squared"]


def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"the two batches must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"expected a batch of images [n, ...], got shape {list(a.shape)}")
    b = b.to(a.device)
    return a.detach().reshape(a.shape[0], -1).double(), b.detach().reshape(b.shape[0], -1).double()


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, float("nan")))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Uncentred cosine similarity of each image pair, `[n]` float64 (NaN if either image is all zero)."""
    a, b = _flat_pair(a, b)
    return _safe_ratio((a * b).sum(1), a.norm(dim=1) * b.norm(dim=1))


def pearson_r(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each image pair over all pixels and channels, `[n]` float64 in [-1, 1].

    Symmetric. NaN if either image is constant. The paper's "r^2" is this number (not its square).
    """
    a, b = _flat_pair(a, b)
    return cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)).clamp(-1.0, 1.0)


def r_squared(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination of `pred` against the reference `ref`, per image pair, `[n]` float64.

    `1 - SS_res / SS_tot` with `SS_res = sum((ref - pred)^2)` and `SS_tot = sum((ref - mean(ref))^2)`, sums and
    mean over all pixels and channels of one image. 1 for a perfect match, 0 for predicting ref's mean, negative
    when worse than that. NaN when `ref` is constant.
    """
    pred, ref = _flat_pair(pred, ref)
    ss_res = ((ref - pred) ** 2).sum(1)
    ss_tot = ((ref - ref.mean(1, keepdim=True)) ** 2).sum(1)
    return 1.0 - _safe_ratio(ss_res, ss_tot)
