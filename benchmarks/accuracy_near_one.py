"""Errors of the float32 kernels near abar = 1 against float64, beside their declared bounds (issue 24, item 3).

    TRITON_INTERPRET=1 python benchmarks/accuracy_near_one.py benchmarks/results/accuracy-near-one.json

ELS with circular padding (one group: every patch of every image), 16 noisy patches of the 2,000 shipped MNIST digits
at abar 0.99 / 0.999 / 0.9999 and P = 3, 5, on the `cpu` kernel, the CUDA source's host path and the Triton kernel
under the interpreter (60 images: the interpreter is slow; it computes its dots in fp32, as "ieee", not fp16x2).
Written up in docs/performance.md, "Accuracy near abar = 1"."""

import json
import math
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from problems import CudaOnHost

from elsfast import datasets
from elsfast.reduce import PatchDictionary, softmax_reduce
from elsfast.reduce.cpu_backend import Cpu
from elsfast.reduce.triton_backend import Triton


def problem(images, M, abar, P, seed):
    H, W = images.shape[2:]
    d = PatchDictionary(images, P, "circular", torch.arange(H * W).view(1, -1))
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, images.shape[0], (M,), generator=g)
    clean = datasets.to_float(images[pick])
    x = math.sqrt(abar) * clean + math.sqrt(1 - abar) * torch.randn(clean.shape, generator=g)
    centre = torch.randint(0, H * W, (M,), generator=g)
    patch = lambda i: PatchDictionary(x[i : i + 1], P, "circular", centre[i].view(1, 1))  # noqa: E731
    q = torch.stack([patch(i).entries(0, 1, torch.float32)[0][0, 0] for i in range(M)]).unsqueeze(0)
    a, T = math.sqrt(abar), 2 * (1 - abar)
    qn, kn = q.norm(dim=-1).max().item(), math.sqrt(d.key_dim)
    return q, d, (2 * a * qn * kn + a * a * kn * kn) / T


rows = []
full = datasets.load("mnist-embedded").images
for abar in (0.99, 0.999, 0.9999):
    for P in (3, 5):
        for name, backend, images in (
            ("cpu", Cpu(), full),
            ("cuda-host", CudaOnHost(), full),
            ("triton-interp", Triton(block_m=16, block_n=64), full[:60]),
        ):
            q, d, L = problem(images, 16, abar, P, 7)
            want = softmax_reduce(q.double(), d, abar=abar, backend="torch").values
            got = softmax_reduce(q, d, abar=abar, backend=backend).values
            err = (got.double() - want).abs().max().item()
            bound = backend.accuracy(torch.float32).bound(torch.float32, L, d.key_dim)
            rows.append(
                dict(abar=abar, P=P, backend=name, images=images.shape[0], L=L, max_error=err, declared_bound=bound)
            )
            print(json.dumps(rows[-1]), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
