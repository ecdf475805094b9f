"""Where every pixel of a machine's output comes from (paper Theorem 4.1: outputs are patch mosaics)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["Provenance"]


@dataclass(frozen=True)
class Provenance:
    """Per-pixel provenance of a denoiser output, all tensors `[B, H, W]`.

    - `source_image`: index (into the machine's training set) of the dominant dictionary entry, the one with the
      largest posterior weight (for IS/ES every pixel of a sample shares it);
    - `source_y`, `source_x`: the pixel of that training image the value came from (the patch centre for LS/ELS;
      the pixel itself for IS; the translated pixel for ES), so `source - pixel` is how far the patch moved;
    - `weight`: the dominant entry's posterior weight, in (0, 1];
    - `entropy`: the entropy of the pixel's posterior over the dictionary, in nats (0: one entry; ln(N S):
      uniform).
    """

    source_image: torch.Tensor
    source_y: torch.Tensor
    source_x: torch.Tensor
    weight: torch.Tensor
    entropy: torch.Tensor

    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dy, dx) `[B, H, W]`: source location minus pixel location (0 for IS and LS)."""
        H, W = self.source_y.shape[-2:]
        ys = torch.arange(H, device=self.source_y.device).view(H, 1)
        xs = torch.arange(W, device=self.source_x.device).view(1, W)
        return self.source_y - ys, self.source_x - xs

    def __getitem__(self, index) -> Provenance:
        """Select samples, like a tensor: `prov[2]`, `prov[1:3]`."""
        return Provenance(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(parts: list[Provenance], index: list[torch.Tensor], batch: int) -> Provenance:
        """Scatter per-class parts back into batch order: part k holds the samples `index[k]`."""
        out = {}
        for f in fields(Provenance):
            first = getattr(parts[0], f.name)
            full = torch.empty(batch, *first.shape[1:], dtype=first.dtype, device=first.device)
            for part, rows in zip(parts, index, strict=True):
                full[rows] = getattr(part, f.name)
            out[f.name] = full
        return Provenance(**out)
