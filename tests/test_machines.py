"""The machines: the exact identities of SPEC section 2, chunking invariance, stability at extreme noise levels and
bad input. Every machine against the float64 brute force of tests/reference.py, on every backend, is
tests/test_backends.py.

Tolerances. The float64 path must agree with the reference to 1e-9 absolute (pure rounding; the tests run at
most a few thousand terms). The float32 path computes logits s = (2a q.k - a^2 |k|^2) / T whose absolute
rounding error is about eps32 * L, with L the largest |s| the data allows; a weight's relative error is then
about eps32 * L and the values lie in [-1, 1], so we require |out - ref| <= 8 * eps32 * L + 1e-6.
"""

import math

import pytest
import torch
from problems import COMBOS, make_problem

from elsfast import ScoreMachine


def test_uint8_training_images_are_mapped():
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8, generator=g)
    x = torch.randn(2, 1, 5, 5, generator=g)
    out_u = ScoreMachine(u, dtype=torch.float64).denoise(x, 0.3, 3)
    out_f = ScoreMachine(u.double() / 127.5 - 1, dtype=torch.float64).denoise(x, 0.3, 3)
    torch.testing.assert_close(out_u, out_f, rtol=0, atol=1e-12)


# -- exact identities (SPEC section 2) -------------------------------------------------------------------------


@pytest.mark.parametrize("abar", [0.05, 0.6, 0.95])
def test_els_zeros_with_huge_patch_is_ls_is_is(abar):
    train, x, _, _ = make_problem(3, 9, 2, 5, 4, 2, abar)
    P = 2 * 5 - 1  # >= 2 max(H, W) - 1
    kw = {"dtype": torch.float64}
    els = ScoreMachine(train, machine="els", padding="zeros", **kw).denoise(x, abar, P)
    ls = ScoreMachine(train, machine="ls", padding="zeros", **kw).denoise(x, abar, P)
    is_ = ScoreMachine(train, machine="is", **kw).denoise(x, abar)
    torch.testing.assert_close(els, ls, rtol=0, atol=1e-10)
    torch.testing.assert_close(ls, is_, rtol=0, atol=1e-10)


@pytest.mark.parametrize("abar", [0.05, 0.6, 0.95])
def test_els_circular_with_full_patch_is_es(abar):
    train, x, _, _ = make_problem(4, 6, 1, 5, 5, 3, abar)
    els = ScoreMachine(train, machine="els", padding="circular", dtype=torch.float64).denoise(x, abar, 5)
    es = ScoreMachine(train, machine="es", padding="circular", dtype=torch.float64).denoise(x, abar)
    torch.testing.assert_close(els, es, rtol=0, atol=1e-10)


# -- chunking invariance ----------------------------------------------------------------------------------------


def _chunks_and_output(m, x, abar, P, labels=None):
    out = m.denoise(x, abar, P, labels)
    return m.last_stats.chunks, out


def _budget_for(make, x, abar, P, target, labels=None):
    """Smallest memory budget whose plan streams at most `target` chunks (chunk count falls as budget grows)."""
    lo, hi = 1, 1 << 34
    while lo < hi:
        mid = (lo + hi) // 2
        if _chunks_and_output(make(mid), x, abar, P, labels)[0] <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@pytest.mark.parametrize(
    ("machine", "padding", "conditional"),
    [
        ("els", "circular", False),
        ("ls", "zeros", False),
        ("is", "zeros", False),
        ("els", "circular", True),
    ],
)
def test_chunking_does_not_change_the_result(machine, padding, conditional):
    # 14 images: 2 chunks of 7, 7 of 2, 5 unequal chunks (3,3,3,3,2), and one chunk per image
    train, x, train_labels, labels = make_problem(5, 14, 1, 6, 6, 3, 0.7)
    x = x.double()  # the float64 machine's result, returned in x's dtype
    if conditional:
        train_labels = torch.zeros(14, dtype=torch.long)
        labels = torch.zeros(3, dtype=torch.long)

    def make(budget, dtype=torch.float64):
        return ScoreMachine(train, train_labels, machine=machine, padding=padding, dtype=dtype, memory_budget=budget)

    whole = make(1 << 34).denoise(x, 0.7, 3, labels)
    for target in (1, 2, 5, 7, 14):
        budget = _budget_for(make, x, 0.7, 3, target, labels)
        chunks, out = _chunks_and_output(make(budget), x, 0.7, 3, labels)
        assert chunks == target
        torch.testing.assert_close(out, whole, rtol=0, atol=1e-12)
        _chunks32, out32 = _chunks_and_output(make(budget, torch.float32), x, 0.7, 3, labels)
        torch.testing.assert_close(out32.double(), whole, rtol=0, atol=1e-5)


def test_chunking_invariance_boundary_broken_conditional():
    # unequal classes (sizes 7, 5, 3) so every class splits into chunks of different sizes
    train, x, _, _ = make_problem(6, 15, 2, 7, 6, 4, 0.4)
    train_labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    labels = torch.tensor([2, 0, 1, 0])

    def run(budget):
        m = ScoreMachine(train, train_labels, machine="els", padding="zeros", dtype=torch.float64, memory_budget=budget)
        return _chunks_and_output(m, x, 0.4, 3, labels)

    # 1 byte, the largest, and steps of 1.25x where the chunking changes (about 100-200 kB on this problem; every
    # count from one image a chunk to all of them a chunk shows between 1.25^44 and 1.25^64 bytes)
    budgets = [1, *(int(1.25**k) for k in range(44, 64)), int(1.25**79)]
    counts, outs = zip(*(run(b) for b in budgets), strict=False)
    assert counts[0] > counts[-1] and len(set(counts)) >= 4, counts
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-12)


def test_batch_elements_are_independent():
    # The stabiliser is per sample and per pixel: a sample far from everything must not change its neighbours.
    train, x, _, _ = make_problem(7, 10, 1, 6, 6, 3, 0.999)
    far = x.clone()
    far[1] = 40.0
    m = ScoreMachine(train, machine="els", padding="zeros")
    a, b = m.denoise(x, 0.999, 3), m.denoise(far, 0.999, 3)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], rtol=0, atol=0)
    assert torch.isfinite(b).all()
    single = torch.cat([m.denoise(x[i : i + 1], 0.999, 3) for i in range(3)])
    torch.testing.assert_close(single, a, rtol=0, atol=1e-6)


# -- stability --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("machine", "padding"), COMBOS)
@pytest.mark.parametrize("abar", [1e-4, 0.9999])
def test_extreme_noise_levels_are_finite(machine, padding, abar):
    train, x, _, _ = make_problem(8, 6, 1, 5, 5, 2, abar)
    out = ScoreMachine(train, machine=machine, padding=padding).denoise(x * 50, abar, 3)
    assert torch.isfinite(out).all()


def test_low_noise_returns_centre_of_nearest_patch():
    train, x, _, _ = make_problem(9, 7, 1, 6, 6, 2, 0.5)
    P, abar = 3, 0.9999
    out = ScoreMachine(train, machine="els", padding="circular").denoise(x, abar, P)
    # brute force: nearest circular patch of a * train to each query patch
    pad = lambda t: torch.nn.functional.pad(t, (1, 1, 1, 1), mode="circular")  # noqa: E731
    qp = pad(x).unfold(2, P, 1).unfold(3, P, 1).reshape(2, 36, 9)
    kp = pad(train).unfold(2, P, 1).unfold(3, P, 1).reshape(7 * 36, 9)
    nearest = torch.cdist(qp.double(), math.sqrt(abar) * kp.double()).argmin(-1)
    expected = kp[:, 4][nearest].reshape(2, 1, 6, 6)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_uniform_weights_at_high_noise():
    train, x, _, _ = make_problem(10, 5, 1, 4, 4, 1, 0.5)
    out = ScoreMachine(train, machine="is", dtype=torch.float64).denoise(x.double() * 1e-3, 1e-9 + 1e-12)
    torch.testing.assert_close(out[0], train.double().mean(0), rtol=0, atol=1e-6)


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.fixture
def small():
    train = torch.rand(4, 1, 5, 5) * 2 - 1
    return ScoreMachine(train, torch.tensor([0, 0, 1, 1])), torch.zeros(2, 1, 5, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": 4}, "odd"),
        ({"patch_size": 0}, "odd"),
        ({"patch_size": -3}, "odd"),
        ({"patch_size": 2.5}, "odd"),
        ({"abar": 0.0}, "between 0 and 1"),
        ({"abar": 1.0}, "between 0 and 1"),
        ({"abar": -0.5}, "between 0 and 1"),
        ({"labels": [0]}, "one per sample"),
        ({"labels": [0, 5]}, "class 5 has no training images"),
    ],
)
def test_bad_denoise_arguments(small, kwargs, match):
    m, x = small
    args = {"abar": 0.5, "patch_size": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        m.denoise(x, args.pop("abar"), **args)


def test_bad_x(small):
    m, x = small
    with pytest.raises(ValueError, match="shape"):
        m.denoise(torch.zeros(2, 3, 5, 5), 0.5)
    with pytest.raises(ValueError, match="shape"):
        m.denoise(torch.zeros(2, 1, 6, 5), 0.5)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        m.denoise(torch.zeros(1, 5, 5), 0.5)
    x[0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.denoise(x, 0.5)


def test_bad_construction():
    train = torch.rand(4, 1, 5, 5) * 2 - 1
    x = torch.zeros(1, 1, 5, 5)
    with pytest.raises(ValueError, match="no train_labels"):
        ScoreMachine(train).denoise(x, 0.5, 3, labels=[0])
    with pytest.raises(ValueError, match="unknown machine"):
        ScoreMachine(train, machine="elss")
    with pytest.raises(ValueError, match="unknown padding"):
        ScoreMachine(train, padding="reflect")
    with pytest.raises(ValueError, match="reduces to IS"):
        ScoreMachine(train, machine="es", padding="zeros")
    with pytest.raises(ValueError, match="unknown backend"):
        ScoreMachine(train, backend="cuda-magic")
    with pytest.raises(ValueError, match="empty"):
        ScoreMachine(train[:0])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ScoreMachine(train * 3)
    with pytest.raises(ValueError, match="train_labels must have shape"):
        ScoreMachine(train, [0, 1])
    bad = train.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ScoreMachine(bad)


@pytest.mark.parametrize("abar", [0.05, 0.3, 0.9])
def test_eps_and_score_are_the_gradient_of_the_log_density(abar):
    """The IS machine's noisy density is a Gaussian mixture, p(x) = mean_n N(x; sqrt(abar) t_n, (1 - abar) I): its
    `score` must be the gradient of log p (by autograd, independent of the machine's formulas) and its `eps` the
    noise that score implies, -sqrt(1 - abar) grad log p."""
    g = torch.Generator().manual_seed(17)
    train = torch.rand(5, 1, 4, 5, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(3, 1, 4, 5, generator=g, dtype=torch.float64)
    m = ScoreMachine(train, machine="is", dtype=torch.float64)
    x_grad = x.clone().requires_grad_(True)
    distance2 = (x_grad.flatten(1)[:, None] - math.sqrt(abar) * train.flatten(1)[None]).square().sum(-1)
    torch.logsumexp(-distance2 / (2 * (1 - abar)), dim=1).sum().backward()
    grad_log_p = x_grad.grad
    torch.testing.assert_close(m.score(x, abar), grad_log_p, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.eps(x, abar), -math.sqrt(1 - abar) * grad_log_p, rtol=1e-9, atol=1e-9)


def test_valid_dictionary_options_and_round_trip(tmp_path):
    """dictionary="valid" is an ELS option; its patches must fit inside the images; it is saved with the machine
    and its sources all lie at centres of patches inside the images."""
    train, x, _, _ = make_problem(21, 6, 1, 7, 6, 2, 0.999)
    with pytest.raises(ValueError, match="option of the ELS machine"):
        ScoreMachine(train, machine="ls", dictionary="valid")
    with pytest.raises(ValueError, match="unknown dictionary"):
        ScoreMachine(train, dictionary="full")
    m = ScoreMachine(train, dictionary="valid", padding="circular", dtype=torch.float64)
    with pytest.raises(ValueError, match="does not fit"):
        m.denoise(x, 0.5, 7)
    out, prov = m.denoise(x, 0.999, 5, return_provenance=True)
    assert int(prov.source_y.min()) >= 2 and int(prov.source_y.max()) <= 4
    assert int(prov.source_x.min()) >= 2 and int(prov.source_x.max()) <= 3
    m.save_pretrained(tmp_path)
    back = ScoreMachine.from_pretrained(tmp_path, train_images=train)
    assert back.dictionary == "valid"
    # with provenance, as `out` (the torch path then reduces over distinct patches: another rounding of the sums)
    back_out, _ = back.to(dtype=torch.float64).denoise(x, 0.999, 5, return_provenance=True)
    torch.testing.assert_close(back_out, out, rtol=0, atol=0)
