"""`training_set_sha256`: the one content hash of a training set, wherever one is recorded or compared;
`module_sha256`: the one content hash of a network's weights (comparison reports, diffusers networks).

Machines (`ScoreMachine.fingerprint`), the reduction's caches (`elsfast.reduce.caches.content_hash`), comparison
reports and network checkpoints all identify their training set with it, so the same images and labels give the
same hex digest everywhere.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["module_sha256", "training_set_sha256"]


def training_set_sha256(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """SHA-256 (hex) of `images` (any shape and dtype: its shape, dtype name and bytes in C order) and, when
    given, of `labels` as int64."""
    digest = hashlib.sha256(repr((tuple(images.shape), str(images.dtype))).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(torch.as_tensor(labels).to(torch.int64).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def module_sha256(module: torch.nn.Module) -> str:
    """SHA-256 (hex) of a module's `state_dict`: every entry's name and bytes, in the order of the sorted names."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
