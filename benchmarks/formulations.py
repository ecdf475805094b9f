"""Other formulations of the core reduction that the benchmarks compare elsfast with."""

import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from elsfast import ScoreMachine
from elsfast.reduce import PatchDictionary
from elsfast.reduce.patches import extract_patches, group_sets

QUERY_BLOCK = 256

# The SDPA kernels tried, fastest first, each with how it gets the augmented keys (dimension D + 1) and the values
# (dimension E = C, 1 or 3) padded with zeros, which changes no logit and no output: the fused kernels refuse E = 3
# (flash needs the values as wide as the keys, memory-efficient attention dimensions that are multiples of 8), and
# then torch falls back to the math kernel, which materialises the whole logit matrix. (kernel, key dimension a
# multiple of, value dimension a multiple of or "same": as wide as the keys.)
SDPA_KERNELS = [
    ("FLASH_ATTENTION", 8, "same"),
    ("EFFICIENT_ATTENTION", 8, 8),
    ("EFFICIENT_ATTENTION", 8, "same"),
    ("CUDNN_ATTENTION", 8, "same"),
    ("MATH", 1, 1),
]
_CHOSEN: dict[tuple, dict] = {}


def _pad(t: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(t, (0, -t.shape[-1] % multiple)) if multiple > 1 else t


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_multiple: int, value_multiple: int | str):
    q, k = _pad(q, key_multiple), _pad(k, key_multiple)
    v = F.pad(v, (0, k.shape[-1] - v.shape[-1])) if value_multiple == "same" else _pad(v, value_multiple)
    return q, k, v


def sdpa_kernel_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The fastest SDPA kernel that accepts these (augmented, (G, 1, L, D + 1)) queries, keys and values once
    padded as it wants: each of SDPA_KERNELS is tried in turn on a slice of the inputs under `sdpa_kernel`.
    Returns {"kernel", "key_dim", "value_dim", "padding", "refused": {kernel: torch's reason}}, cached per device,
    dtype and dimensions."""
    key = (q.device.type, q.dtype, q.shape[-1], v.shape[-1])
    if key not in _CHOSEN:
        refused = {}
        for name, key_multiple, value_multiple in SDPA_KERNELS:
            qs, ks, vs = _padded(q[:1, :, :8], k[:1, :, :8], v[:1, :, :8], key_multiple, value_multiple)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel(getattr(SDPBackend, name)):
                        F.scaled_dot_product_attention(qs, ks, vs, scale=1.0)
                except RuntimeError as error:
                    why = [str(w.message).split("(Triggered internally")[0].strip() for w in seen]
                    why = [w for w in why if w and not w.endswith("not used because:")] or [str(error)]
                    refused[f"{name} (values {vs.shape[-1]} wide)"] = "; ".join(why)[:300]
                    continue
            _CHOSEN[key] = {
                "kernel": name,
                "key_dim": ks.shape[-1],
                "value_dim": vs.shape[-1],
                "padding": (key_multiple, value_multiple),
                "refused": refused,
            }
            break
        else:
            raise RuntimeError(f"no SDPA kernel accepts these inputs: {refused}")
    return _CHOSEN[key]


def sdpa_denoise(
    m: ScoreMachine, x: torch.Tensor, abar: float, P: int, images: int | None = None, info: dict | None = None
) -> torch.Tensor:
    """The same ELS/LS evaluation as one `scaled_dot_product_attention` call per group set, with the augmented
    keys of SPEC section 5: q' = [2a q / T, 1], k' = [k, -a^2 |k|^2 / T]. The whole dictionary is materialised;
    queries go in blocks of `QUERY_BLOCK` because torch's CPU SDPA forms the full block x dictionary matrix
    (all 4,608 queries at once take over 20 GB). `images`: use only the first `images` training images (for
    dictionaries too large to materialise; the pairs computed are then M x images x S). Runs the fastest SDPA
    kernel that accepts the inputs zero-padded (`sdpa_kernel_for`); `info`, when given, receives its choice."""
    a, T = math.sqrt(abar), 2 * (1 - abar)
    B, C, H, W = x.shape
    out = torch.empty(B, C, H * W, device=x.device)
    for positions in group_sets(H, W, P, m.padding, m.machine):
        G, S = positions.shape
        q = extract_patches(x, P, m.padding, positions).reshape(G, 1, S * B, -1)
        d = PatchDictionary(m.images, P, m.padding, positions.to(m.images.device))
        k, v = d.entries(0, images or d.num_images, torch.float32)
        q_aug = torch.cat([q * (2 * a / T), torch.ones(*q.shape[:3], 1, device=q.device)], dim=-1)
        k_aug = torch.cat([k, -(a * a / T) * (k * k).sum(-1, keepdim=True)], dim=-1)[:, None]
        v = v[:, None]
        chosen = sdpa_kernel_for(q_aug, k_aug, v)
        if info is not None:
            info.update(chosen)
        q_aug, k_aug, v = _padded(q_aug, k_aug, v, *chosen["padding"])
        with sdpa_kernel(getattr(SDPBackend, chosen["kernel"])):
            values = torch.cat(
                [
                    F.scaled_dot_product_attention(q_aug[:, :, i : i + QUERY_BLOCK], k_aug, v, scale=1.0)
                    for i in range(0, q_aug.shape[2], QUERY_BLOCK)
                ],
                dim=2,
            )
        values = values[..., :C]
        out[:, :, positions.flatten()] = values.reshape(G * S, B, C).permute(1, 2, 0)
    return out.reshape(B, C, H, W)
