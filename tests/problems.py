"""Random test problems of the machines and the float32 tolerance they are held to (shared by the tests of every
backend). Tolerances: see tests/test_machines.py."""

import math

import numpy as np
import torch
from reference import reference_denoise, reference_provenance

EPS32 = torch.finfo(torch.float32).eps

COMBOS = [
    ("is", "zeros"),
    ("es", "circular"),
    ("ls", "zeros"),
    ("ls", "circular"),
    ("els", "zeros"),
    ("els", "circular"),
]


# (machine, padding, conditional, patch size) of the reference comparisons
CASES = []
for machine, padding in COMBOS:
    for conditional in (False, True):
        for P in (1, 3, 5) if machine in ("ls", "els") else (3,):
            CASES.append((machine, padding, conditional, P))


def fp32_tolerance(x: torch.Tensor, train: torch.Tensor, abar: float, patch_size: int, machine: str) -> float:
    """8 * eps32 * L + 1e-6, L = max |2a q.k - a^2|k|^2| / T bounded by norms of the largest patch/image."""
    a, T = math.sqrt(abar), 2 * (1 - abar)
    if machine in ("is", "es"):
        q, k = x.flatten(1).norm(dim=1).max().item(), train.flatten(1).norm(dim=1).max().item()
    else:
        # a patch norm is at most sqrt(P*P) times the largest per-pixel channel norm
        scale = patch_size
        q = scale * x.norm(dim=1).max().item()
        k = scale * train.norm(dim=1).max().item()
    return 8 * EPS32 * (2 * a * q * k + a * a * k * k) / T + 1e-6


def make_problem(seed, N, C, H, W, B, abar, classes=None):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(N, C, H, W, generator=g) * 2 - 1
    # noisy images as the sampler sees them: a training-like image plus noise at level abar
    base = torch.rand(B, C, H, W, generator=g) * 2 - 1
    x = math.sqrt(abar) * base + math.sqrt(1 - abar) * torch.randn(B, C, H, W, generator=g)
    train_labels = labels = None
    if classes:
        train_labels = torch.arange(N) % classes
        labels = torch.randint(0, classes, (B,), generator=g)
    return train, x, train_labels, labels


def reference(x, train, abar, machine, padding, P, labels=None, train_labels=None, provenance=False) -> np.ndarray:
    """The float64 brute force of tests/reference.py on torch tensors: `reference_denoise`, or with `provenance`
    `reference_provenance`."""
    fn = reference_provenance if provenance else reference_denoise
    return fn(
        x.double().numpy(),
        train.double().numpy(),
        abar,
        machine=machine,
        padding=padding,
        patch_size=P,
        labels=None if labels is None else labels.numpy(),
        train_labels=None if train_labels is None else train_labels.numpy(),
    )
