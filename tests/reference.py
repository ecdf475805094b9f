"""Independent float64 brute force of every machine, straight from the definitions of SPEC section 2.

Deliberately shares no code with elsfast: numpy, explicit loops over pixels, explicit dictionary membership.
Only for small problems.
"""

from __future__ import annotations

import numpy as np


def _pad(img: np.ndarray, r: int, padding: str) -> np.ndarray:
    mode = "constant" if padding == "zeros" else "wrap"
    return np.pad(img, ((0, 0), (r, r), (r, r)), mode=mode)


def _border_class(i: int, length: int, r: int):
    return i if (i < r or i > length - 1 - r) else "interior"


def _softmax_mean(query: np.ndarray, keys: np.ndarray, values: np.ndarray, abar: float) -> np.ndarray:
    a, T = np.sqrt(abar), 2 * (1 - abar)
    logits = -((query[None] - a * keys) ** 2).sum(1) / T
    w = np.exp(logits - logits.max())
    return (w[:, None] * values).sum(0) / w.sum()


def reference_denoise(x, train, abar, *, machine, padding="zeros", patch_size=3, labels=None, train_labels=None):
    """E[x0 | x] for x [B, C, H, W] and train [N, C, H, W] (float64 numpy), per SPEC section 2."""
    x, train = np.asarray(x, np.float64), np.asarray(train, np.float64)
    B, C, H, W = x.shape
    out = np.zeros_like(x)
    for b in range(B):
        dic = train if labels is None else train[np.asarray(train_labels) == int(labels[b])]
        if machine == "is":
            flat = dic.reshape(len(dic), -1)
            out[b] = _softmax_mean(x[b].ravel(), flat, flat, abar).reshape(C, H, W)
            continue
        if machine == "es":
            shifted = np.stack([np.roll(d, (dy, dx), axis=(1, 2)) for d in dic for dy in range(H) for dx in range(W)])
            flat = shifted.reshape(len(shifted), -1)
            out[b] = _softmax_mean(x[b].ravel(), flat, flat, abar).reshape(C, H, W)
            continue
        P, r = patch_size, patch_size // 2
        xp = _pad(x[b], r, padding)
        dp = [_pad(d, r, padding) for d in dic]
        for y in range(H):
            for z in range(W):
                q = xp[:, y : y + P, z : z + P].ravel()
                keys, values = [], []
                for d, dpad in zip(dic, dp, strict=False):
                    for y2 in range(H):
                        for z2 in range(W):
                            if machine == "ls":
                                member = (y2, z2) == (y, z)
                            elif padding == "circular":
                                member = True
                            else:
                                member = (_border_class(y2, H, r), _border_class(z2, W, r)) == (
                                    _border_class(y, H, r),
                                    _border_class(z, W, r),
                                )
                            if member:
                                keys.append(dpad[:, y2 : y2 + P, z2 : z2 + P].ravel())
                                values.append(d[:, y2, z2])
                out[b, :, y, z] = _softmax_mean(q, np.array(keys), np.array(values), abar)
    return out
