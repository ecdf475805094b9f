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


def _posterior(query: np.ndarray, keys: np.ndarray, abar: float) -> np.ndarray:
    a, T = np.sqrt(abar), 2 * (1 - abar)
    logits = -((query[None] - a * keys) ** 2).sum(1) / T
    w = np.exp(logits - logits.max())
    return w / w.sum()


def _problems(x, train, *, machine, padding="zeros", patch_size=3, labels=None, train_labels=None, dictionary="same"):
    """Yield (b, pixel or None, query, keys, values, sources) for every softmax of the machine; a source is
    (training image index, source y, source x) for each dictionary entry (pixel None: one softmax per image).
    `dictionary="valid"` (ELS): every pixel's dictionary is the patches lying fully inside the training images."""
    B, _, H, W = x.shape
    for b in range(B):
        members = np.arange(len(train)) if labels is None else np.flatnonzero(np.asarray(train_labels) == labels[b])
        if machine in ("is", "es"):
            shifts = [(dy, dx) for dy in range(H) for dx in range(W)] if machine == "es" else [(0, 0)]
            keys = np.stack([np.roll(train[n], (dy, dx), axis=(1, 2)).ravel() for n in members for dy, dx in shifts])
            # pixel (y, x) of roll(image, (dy, dx)) is pixel (y - dy, x - dx) of the image: source offset (-dy, -dx)
            sources = [(n, -dy, -dx) for n in members for dy, dx in shifts]
            yield b, None, x[b].ravel(), keys, keys, sources
            continue
        P, r = patch_size, patch_size // 2
        xp = _pad(x[b], r, padding)
        padded = {n: _pad(train[n], r, padding) for n in members}
        for y in range(H):
            for z in range(W):
                keys, values, sources = [], [], []
                for n in members:
                    for y2 in range(H):
                        for z2 in range(W):
                            if machine == "ls":
                                member = (y2, z2) == (y, z)
                            elif dictionary == "valid":
                                member = r <= y2 <= H - 1 - r and r <= z2 <= W - 1 - r
                            elif padding == "circular":
                                member = True
                            else:
                                member = (_border_class(y2, H, r), _border_class(z2, W, r)) == (
                                    _border_class(y, H, r),
                                    _border_class(z, W, r),
                                )
                            if member:
                                keys.append(padded[n][:, y2 : y2 + P, z2 : z2 + P].ravel())
                                values.append(train[n][:, y2, z2])
                                sources.append((n, y2, z2))
                query = xp[:, y : y + P, z : z + P].ravel()
                yield b, (y, z), query, np.array(keys), np.array(values), sources


def reference_denoise(x, train, abar, **problem):
    """E[x0 | x] for x [B, C, H, W] and train [N, C, H, W] (float64 numpy), per SPEC section 2; `problem`: the
    machine and its options (`_problems`)."""
    x, train = np.asarray(x, np.float64), np.asarray(train, np.float64)
    out = np.zeros_like(x)
    for b, pixel, query, keys, values, _ in _problems(x, train, **problem):
        mean = _posterior(query, keys, abar) @ values
        if pixel is None:
            out[b] = mean.reshape(x.shape[1:])
        else:
            out[b, :, pixel[0], pixel[1]] = mean
    return out


def reference_provenance(x, train, abar, **problem):
    """Per pixel: (source image, source y, source x, weight of the dominant entry, entropy in nats), each
    [B, H, W]; the dominant entry is the one of largest posterior weight."""
    x, train = np.asarray(x, np.float64), np.asarray(train, np.float64)
    B, _, H, W = x.shape
    out = np.zeros((5, B, H, W))
    for b, pixel, query, keys, _, sources in _problems(x, train, **problem):
        p = _posterior(query, keys, abar)
        j = int(p.argmax())
        entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
        n, sy, sx = sources[j]
        if pixel is None:
            ys, xs = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
            out[:, b] = [
                np.full((H, W), n),
                (ys + sy) % H,
                (xs + sx) % W,
                np.full((H, W), p[j]),
                np.full((H, W), entropy),
            ]
        else:
            out[:, b, pixel[0], pixel[1]] = [n, sy, sx, p[j], entropy]
    return out
