"""Random test problems of the machines and the float32 tolerance they are held to (shared by the tests of every
backend). Tolerances: see tests/test_machines.py. Seeds are fixed numbers or `stable_seed` of the case's
parameters (never `hash()`, which Python randomises per process)."""

import math
import zlib
from typing import ClassVar

import numpy as np
import torch
from reference import reference_denoise, reference_provenance

from elsfast.reduce import Backend
from elsfast.reduce.cuda_backend import Cuda
from elsfast.reduce.cuda_ext import reduce_on_host
from elsfast.reduce.partials import COMPILED_KERNEL_LIMITS, compiled_kernel_reasons
from elsfast.reduce.registry import BackendOutput

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


def stable_seed(*parts) -> int:
    """A seed from a case's parameters that is the same in every process (CRC-32 of their repr)."""
    return zlib.crc32(repr(parts).encode())


def logit_range(x: torch.Tensor, train: torch.Tensor, abar: float, patch_size: int, machine: str) -> float:
    """L = max |2a q.k - a^2 |k|^2| / T (nats), bounded by the norms of the largest patch/image; `train` in [-1, 1]."""
    a, T = math.sqrt(abar), 2 * (1 - abar)
    if machine in ("is", "es"):
        q, k = x.flatten(1).norm(dim=1).max().item(), train.flatten(1).norm(dim=1).max().item()
    else:
        # a patch norm is at most sqrt(P*P) times the largest per-pixel channel norm
        q = patch_size * x.norm(dim=1).max().item()
        k = patch_size * train.norm(dim=1).max().item()
    return (2 * a * q * k + a * a * k * k) / T


def key_dim(train: torch.Tensor, machine: str, patch_size: int) -> int:
    """D of the machine's keys: C P^2 for patches (LS, ELS), C H W for whole images (IS, ES)."""
    C, H, W = train.shape[1:]
    return C * (patch_size**2 if machine in ("ls", "els") else H * W)


def fp32_tolerance(x: torch.Tensor, train: torch.Tensor, abar: float, patch_size: int, machine: str) -> float:
    """8 * eps32 * L + 1e-6 (`logit_range`): the float32 bound every exact backend declares."""
    return 8 * EPS32 * logit_range(x, train, abar, patch_size, machine) + 1e-6


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


def reference(
    x, train, abar, machine, padding, P, labels=None, train_labels=None, provenance=False, dictionary="same"
) -> np.ndarray:
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
        dictionary=dictionary,
    )


class CudaOnHost(Backend):
    """The CUDA kernel's algorithm (csrc/reduce.cu `reduce_host`), serial on the CPU, with dictionary splits: how
    the CUDA source is checked without a GPU."""

    NAME = "cuda-host"
    LIMITS: ClassVar[dict[str, str]] = {**COMPILED_KERNEL_LIMITS, "host": "needs CPU tensors (the host path)"}

    def unsupported_reasons(self, queries, dictionary):
        reasons = compiled_kernel_reasons(self, queries, dictionary)
        return reasons + ([] if queries.device.type == "cpu" else [self.refuse("host", str(queries.device))])

    def accuracy(self, dtype):
        return Cuda().accuracy(dtype)  # the same source

    def reduce(self, queries, dictionary, *, abar, memory_budget, provenance=False):
        state = reduce_on_host(queries, dictionary, abar=abar, provenance=provenance, splits=3)
        return BackendOutput(state, 1)
