"""Accuracy of the float32 torch path (issue 14, item 7) and the bound docs/performance.md states for it.

The torch backend computes each tile's logits in float32, folds them into a float64 running state and sums each
tile's entries with torch sums (blockwise pairwise), so its error is that of the fp32 logits plus a few fp32
roundings, independent of the memory budget (how many tiles and chunks a query's dictionary is cut into):

    |out32 - out64| <= 4 eps32 L + 1e-6,   L = max |logit| in nats, bounded from the norms (tests/problems.py)

(a weighted mean of values in [-1, 1] moves by at most twice the largest logit error (nats); a logit's error
measures up to about 2 eps32 L (1.9 eps32 on IS at D = 1,024; its worst case, (D/2 + 2) eps32 L, is never near);
1e-6 covers exp2, the tile sums and the final casts). Measured over the grid below: at most 0.16 eps32 L + 3e-7.
Before, fp32 merges (thousands per query at small budgets) and fp32 matrix-vector value sums (one dominant weight
swallows every weight below half its ulp) added up to 2e-4 on MNIST.

The full case of the issue (2,000 embedded digits, 8 images, budgets 512 MiB to 1 MiB, within 2e-5) takes minutes
on 2 cores: benchmarks/bench_torch_accuracy.py. Here a reduced MNIST case (100 digits, one image) that the old code
failed at both budgets (9.6e-5 at 512 MiB, 7.6e-6 at 1 MiB; now 7.3e-7 at both).
"""

import math

import numpy as np
import pytest
import torch
from problems import CASES, EPS32, make_problem, reference

from elsfast import ScoreMachine, datasets
from elsfast.reduce.torch_backend import tile_state


def torch_fp32_bound(x: torch.Tensor, train: torch.Tensor, abar: float, patch_size: int, machine: str) -> float:
    """The float32 torch path's bound (docs/performance.md): 4 eps32 L + 1e-6, L as in `problems.fp32_tolerance`."""
    a, T = math.sqrt(abar), 2 * (1 - abar)
    if machine in ("is", "es"):
        q, k = x.flatten(1).norm(dim=1).max().item(), train.flatten(1).norm(dim=1).max().item()
    else:
        q, k = patch_size * x.norm(dim=1).max().item(), patch_size * train.norm(dim=1).max().item()
    return 4 * EPS32 * (2 * a * q * k + a * a * k * k) / T + 1e-6


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("provenance", [False, True])
def test_tile_sums_keep_weights_below_half_an_ulp(channels, provenance):
    # one entry of weight 1 and 4,095 of weight 2^-24.5 (under half an ulp of 1): a sequential fp32 sum drops all
    # of them (1.7e-4 of the total); torch sums keep them
    n = 4096
    logits = torch.full((2, 3, n), -24.5)
    logits[:, :, 0] = 0.0
    values = torch.full((2, n, channels), -1.0)
    values[:, 0] = 1.0
    ids = torch.arange(n) if provenance else None
    scratch = torch.empty_like(logits).flatten()
    exact_w = torch.exp2(logits.double())
    exact_l, exact_acc = exact_w.sum(-1), torch.einsum("gmn,gne->gme", exact_w, values.double())
    state = tile_state(logits.clone(), values.transpose(1, 2).contiguous(), values, scratch, ids)
    assert (state.m == 0).all()
    torch.testing.assert_close(state.l.double(), exact_l, rtol=1e-6, atol=0)
    if channels <= 4:  # more channels (IS/ES images) keep the matrix product
        torch.testing.assert_close(state.acc.double(), exact_acc, rtol=1e-6, atol=0)
    if provenance:
        assert (state.best == 0).all()
        exact_u = (exact_w * (logits.double() - 0)).sum(-1)
        torch.testing.assert_close(state.u.double(), exact_u, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def mnist_case():
    train = datasets.load("mnist-embedded", pad_to=32).images[:100]
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    exact = ScoreMachine(train, backend="torch", dtype=torch.float64).denoise(x.double(), 0.5, 5)
    return train, x, exact


@pytest.mark.slow_ci
def test_reduced_mnist_case_does_not_depend_on_the_budget(mnist_case):
    train, x, exact = mnist_case
    outs = []
    for budget in (512 << 20, 1 << 20):
        m = ScoreMachine(train, backend="torch", memory_budget=budget)
        out = m.denoise(x, 0.5, 5)
        err = (out.double() - exact).abs().max().item()
        assert err <= 3e-6, f"budget {budget}: max error {err:.3g} ({m.last_stats.chunks} chunks)"
        assert err <= torch_fp32_bound(x, train.float() / 127.5 - 1, 0.5, 5, "els")
        outs.append(out)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-6


# every machine, padding and conditioning of tests/problems.py, seeds by position (reproducible);
# measured: at most 0.16 eps32 L + 3e-7
GRID = [(*case, abar) for case in CASES for abar in (0.01, 0.5, 0.999)]


@pytest.mark.parametrize(("machine", "padding", "conditional", "P", "abar"), GRID)
def test_float32_within_the_stated_bound(machine, padding, conditional, P, abar):
    # the smallest budget: one image per chunk, the smallest tiles, the most merges (the default budget is held to
    # the looser bound of every backend in tests/test_machines.py)
    seed = 1000 + GRID.index((machine, padding, conditional, P, abar))
    C = 3 if P == 3 else 1
    H, W = (6, 7) if machine != "es" else (5, 6)
    train, x, train_labels, labels = make_problem(seed, 8 if machine != "es" else 5, C, H, W, 3, abar, 3 * conditional)
    ref = reference(x, train, abar, machine, padding, P, labels, train_labels)
    m = ScoreMachine(train, train_labels, machine=machine, padding=padding, backend="torch", memory_budget=1)
    err = np.abs(m.denoise(x, abar, P, labels).double().numpy() - ref).max()
    bound = torch_fp32_bound(x, train, abar, P, machine)
    assert err <= bound, f"seed {seed}: max error {err:.3g} > {bound:.3g}"
