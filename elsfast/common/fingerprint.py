"""`training_set_sha256`: the one content hash of a training set, wherever one is recorded or compared.

Machines (`ScoreMachine.fingerprint`), the reduction's caches (`elsfast.reduce.caches.content_hash`), comparison
reports and network checkpoints all identify their training set with it, so the same images and labels give the
same hex digest everywhere.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["training_set_sha256"]


def training_set_sha256(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """SHA-256 (hex) of `images` (any shape and dtype: its shape, dtype name and bytes in C order) and, when
    given, of `labels` as int64."""
    digest = hashlib.sha256(repr((tuple(images.shape), str(images.dtype))).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(torch.as_tensor(labels).to(torch.int64).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
