"""Other formulations of the core reduction that the benchmarks compare elsfast with."""

import math

import torch
import torch.nn.functional as F

from elsfast import ScoreMachine
from elsfast.patches import extract_patches, group_sets
from elsfast.reduce import PatchDictionary

QUERY_BLOCK = 256


def sdpa_denoise(m: ScoreMachine, x: torch.Tensor, abar: float, P: int, images: int | None = None) -> torch.Tensor:
    """The same ELS/LS evaluation as one `scaled_dot_product_attention` call per group set, with the augmented
    keys of SPEC section 5: q' = [2a q / T, 1], k' = [k, -a^2 |k|^2 / T]. The whole dictionary is materialised;
    queries go in blocks of `QUERY_BLOCK` because torch's CPU SDPA forms the full block x dictionary matrix
    (all 4,608 queries at once take over 20 GB). `images`: use only the first `images` training images (for
    dictionaries too large to materialise; the pairs computed are then M x images x S)."""
    a, T = math.sqrt(abar), 2 * (1 - abar)
    B, C, H, W = x.shape
    out = torch.empty(B, C, H * W, device=x.device)
    for positions in group_sets(H, W, P, m.padding, m.machine):
        G, S = positions.shape
        q = extract_patches(x, P, m.padding, positions).reshape(G, S * B, -1)
        d = PatchDictionary(m.images, P, m.padding, positions.to(m.images.device))
        k, v = d.entries(0, images or d.num_images, torch.float32)
        q_aug = torch.cat([q * (2 * a / T), torch.ones(*q.shape[:2], 1, device=q.device)], dim=-1)
        k_aug = torch.cat([k, -(a * a / T) * (k * k).sum(-1, keepdim=True)], dim=-1)
        values = torch.cat(
            [
                F.scaled_dot_product_attention(q_aug[:, i : i + QUERY_BLOCK], k_aug, v, scale=1.0)
                for i in range(0, q_aug.shape[1], QUERY_BLOCK)
            ],
            dim=1,
        )
        out[:, :, positions.flatten()] = values.reshape(G * S, B, C).permute(1, 2, 0)
    return out.reshape(B, C, H, W)
