"""Exact gradients of the machines (issue 26, item 1): `denoise`, `eps` and `score` differentiate through the
softmax-weighted mean (a covariance under its weights, `elsfast.reduce.grad`), checked by finite differences in
float64 for every machine and padding; approximate backends refuse; the float32 CPU kernel's forward and the
backward agree with float64."""

import math

import pytest
import torch
from test_distributed import needs_gloo, run_two_ranks

import elsfast.reduce.grad as grad_module
from elsfast import ScoreMachine
from elsfast.common.schedules import abar_cosine_legacy, beta
from elsfast.reduce import ImageDictionary, PatchDictionary, TopK, softmax_reduce
from elsfast.reduce.grad import NotDifferentiable, check_differentiable, query_vjp
from elsfast.reduce.patches import group_sets
from elsfast.sampling import ode

EPS32 = torch.finfo(torch.float32).eps

# (machine, padding, dictionary, patch size): every machine and padding; P = 5 on 4 x 3 images wraps (circular) and
# crosses every border class (zeros); the valid dictionary of ELS
GRADCHECK_CASES = [
    ("is", "zeros", "same", 3),
    ("is", "circular", "same", 3),
    ("es", "circular", "same", 3),
    ("ls", "zeros", "same", 3),
    ("ls", "circular", "same", 5),
    ("els", "zeros", "same", 3),
    ("els", "zeros", "same", 5),
    ("els", "circular", "same", 3),
    ("els", "circular", "same", 5),
    ("els", "zeros", "valid", 3),
]


def small_problem(seed: int, dtype=torch.float64, N: int = 5, C: int = 2, H: int = 4, W: int = 3):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(N, C, H, W, generator=g, dtype=dtype) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1, 1, 0][:N])
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype) * 0.6
    return train, labels, x


@pytest.mark.parametrize(("machine", "padding", "dictionary", "P"), GRADCHECK_CASES)
def test_gradcheck_every_machine_conditional_batch_two(machine, padding, dictionary, P):
    """Analytic against finite-difference Jacobians (float64), class-conditional, a batch of 2 from different
    classes, through denoise and score (which is linear in x and D)."""
    train, labels, x = small_problem(2601)
    m = ScoreMachine(train, labels, machine=machine, padding=padding, dictionary=dictionary, dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m.denoise(x, 0.6, P, labels=[0, 1]), (x,))
    assert torch.autograd.gradcheck(lambda x: m.score(x, 0.3, P, labels=[1, 1]), (x,), fast_mode=True)


def test_gradcheck_unconditional_uint8_training_set_and_eps():
    """uint8 training images (mapped to [-1, 1] chunk by chunk, in the backward as in the forward)."""
    train, _, x = small_problem(2602)
    train = ((train + 1) * 127.5).round().to(torch.uint8)
    m = ScoreMachine(train, machine="els", padding="zeros", dtype=torch.float64)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: m.eps(x, 0.8, 3), (x,))


def test_score_gradient_is_no_longer_the_linear_term_alone():
    """Before: `denoise` returned a detached tensor, so d(sum score)/dx was -1/(1 - abar) at every pixel (the
    linear term). Now the posterior mean's dependence on x counts, and matches a central difference."""
    train, labels, x = small_problem(2603)
    m = ScoreMachine(train, labels, machine="els", padding="circular", dtype=torch.float64)
    abar = 0.5
    x.requires_grad_()
    assert m.denoise(x, abar, 3).requires_grad
    m.score(x, abar, 3).sum().backward()
    linear_only = -1.0 / (1.0 - abar)
    assert (x.grad - linear_only).abs().max() > 0.1
    h, i = 1e-6, (1, 0, 2, 1)
    step = torch.zeros_like(x)
    step[i] = h
    with torch.no_grad():
        fd = (m.score(x + step, abar, 3).sum() - m.score(x - step, abar, 3).sum()) / (2 * h)
    assert abs(x.grad[i].item() - fd.item()) < 1e-7


def test_no_graph_without_requires_grad():
    train, _, x = small_problem(2604)
    m = ScoreMachine(train, machine="ls", dtype=torch.float64)
    assert not m.denoise(x, 0.5, 3).requires_grad
    with torch.no_grad():
        assert not m.denoise(x.requires_grad_(), 0.5, 3).requires_grad


def test_approximate_backend_refuses_an_input_that_requires_grad():
    train, _, x = small_problem(2605)
    m = ScoreMachine(train, machine="els", padding="circular", backend=TopK(k=2), dtype=torch.float64)
    with pytest.raises(NotDifferentiable, match="'topk' approximates the softmax"):
        m.score(x.clone().requires_grad_(), 0.5, 3)
    pytest.importorskip("faiss", reason="the top-k backend needs faiss (pip install 'elsfast[faiss]')")
    with torch.no_grad():  # without a gradient it runs as before
        m.score(x.clone().requires_grad_(), 0.5, 3)
    m.denoise(x, 0.5, 3)


@pytest.mark.parametrize("kind", ["patches", "images"])
def test_backward_is_the_same_at_every_chunk_and_tile_size(monkeypatch, kind):
    """The streaming pass over one image per chunk and tiles of a few pairs equals the one-tile pass."""
    train, _, x = small_problem(2606, N=7)
    if kind == "patches":
        positions = group_sets(4, 3, 3, "zeros", "els")[0]
        dictionary = PatchDictionary(train, 3, "zeros", positions)
        from elsfast.reduce.patches import extract_patches

        queries = extract_patches(x, 3, "zeros", positions).reshape(positions.shape[0], -1, 18)
    else:
        dictionary = ImageDictionary(train, shifts=True)
        queries = x.reshape(1, 2, -1)
    r = softmax_reduce(queries, dictionary, abar=0.4, backend="torch")
    g = torch.randn_like(r.values)
    whole = query_vjp(queries, dictionary, g, r.values, r.log_normaliser, abar=0.4, memory_budget=1 << 30)
    monkeypatch.setattr(grad_module, "MIN_TILE", 2)
    monkeypatch.setattr(grad_module, "TILE_BYTES", 16)
    assert grad_module.plan_backward(queries, dictionary, 1)[0] == 1
    tiled = query_vjp(queries, dictionary, g, r.values, r.log_normaliser, abar=0.4, memory_budget=1)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", ["cpu", "dedup", "shifts"])
def test_float32_compiled_forward_and_backward_against_float64(cpu_ext, backend):
    """A compiled kernel's float32 forward feeds the backward's normaliser: vector-Jacobian products agree with
    float64 within eps32 L of the gradient's largest entry (L: a bound on the logits' magnitude, in nats; float32
    logits are off by about eps32 L, and so, relatively, are the recomputed weights; measured 0.044 eps32 L)."""
    g = torch.Generator().manual_seed(2607)
    train = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    x = torch.randn(2, 1, 8, 8, generator=g) * 0.7
    upstream = torch.randn(2, 1, 8, 8, generator=g)
    abar, P = 0.6, 3
    grads = {}
    for dtype, name in ((torch.float32, backend), (torch.float64, "torch")):
        m = ScoreMachine(train, machine="els", padding="zeros", backend=name, dtype=dtype, memory_budget="1M")
        xs = x.to(dtype).detach().requires_grad_()
        out = m.denoise(xs, abar, P)
        assert m.last_stats.backends == {name}
        (out * upstream.to(dtype)).sum().backward()
        grads[dtype] = (out.detach(), xs.grad)
    a, T = math.sqrt(abar), 2 * (1 - abar)
    # largest logit magnitude |q - a k|^2 / T over queries and keys of values in [-3, 3] and [-1, 1]
    L = (x.abs().max().item() + a) ** 2 * P * P / T
    out32, grad32 = grads[torch.float32]
    out64, grad64 = grads[torch.float64]
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=4 * EPS32 * L + 1e-6)
    scale = grad64.abs().max().item()
    assert (grad32.double() - grad64).abs().max().item() <= EPS32 * L * scale


@needs_gloo
def test_sharded_dictionary_gives_the_one_process_gradient(tmp_path):
    """Each rank streams its shard with the global normaliser; the all-reduced gradient is one process's."""
    worker = """
import sys, torch, torch.distributed as dist
from elsfast import ScoreMachine
rank, world, init, data, dest = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
d = torch.load(data)
lo, hi = (0, 2) if rank == 0 else (2, 5)
m = ScoreMachine(d["train"][lo:hi], machine="els", padding="zeros", dtype=torch.float64,
                 process_group=dist.group.WORLD)
x = d["x"].clone().requires_grad_()
m.score(x, 0.6, 3).sum().backward()
torch.save(x.grad, dest)
dist.barrier()
dist.destroy_process_group()
"""
    train, _, x = small_problem(2608)
    grads = run_two_ranks(tmp_path, worker, {"train": train, "x": x})
    m = ScoreMachine(train, machine="els", padding="zeros", dtype=torch.float64)
    x.requires_grad_()
    m.score(x, 0.6, 3).sum().backward()
    for grad in grads:
        torch.testing.assert_close(grad, x.grad, rtol=0, atol=1e-12)


def test_divergence_of_the_ideal_machine_is_the_laplacian_of_the_log_density():
    """IS is the exact posterior mean of p_t = mean_phi N(sqrt(abar) phi, (1 - abar) I), so the velocity's
    divergence is -beta/2 (C H W + laplacian log p_t): the laplacian from torch's Hessian of the logsumexp."""
    train, labels, x = small_problem(2609, N=6, C=1, H=3, W=3)
    m = ScoreMachine(train, labels, machine="is", dtype=torch.float64)
    t = 0.4
    abar = abar_cosine_legacy(t)
    for conditional in (False, True):
        images = train[labels == 1] if conditional else train

        def log_density(z, images=images):
            d2 = ((z - math.sqrt(abar) * images) ** 2).flatten(1).sum(-1)
            return torch.logsumexp(-d2 / (2 * (1 - abar)), dim=0)

        laplacian = torch.stack([torch.autograd.functional.hessian(log_density, z).reshape(9, 9).trace() for z in x])
        expected = -0.5 * beta(t) * (9 + laplacian)
        got = ode.divergence(m, x, t, labels=1 if conditional else None, coordinates_per_call=4)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_divergence_against_finite_differences_of_the_velocity():
    """ELS with zero padding, class-conditional, a patch size that depends on t, coordinates in uneven chunks."""
    train, labels, x = small_problem(2610)
    m = ScoreMachine(train, labels, machine="els", padding="zeros", dtype=torch.float64)
    t, h, sizes = 0.5, 1e-5, lambda t: 3 if t < 0.6 else 5
    got = ode.divergence(m, x, t, patch_size=sizes, labels=[0, 1], coordinates_per_call=5)
    expected = torch.zeros(2, dtype=torch.float64)
    for i in range(x[0].numel()):
        step = torch.zeros_like(x).reshape(2, -1)
        step[:, i] = h
        step = step.view_as(x)
        up = ode.velocity(m, x + step, t, patch_size=sizes, labels=[0, 1]).reshape(2, -1)[:, i]
        down = ode.velocity(m, x - step, t, patch_size=sizes, labels=[0, 1]).reshape(2, -1)[:, i]
        expected += (up - down) / (2 * h)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_divergence_on_a_one_image_training_set_and_bad_chunks():
    """One training image: D = phi does not depend on x, so div v = beta abar C H W / (2 (1 - abar))."""
    train, _, x = small_problem(2611, N=1)
    m = ScoreMachine(train, machine="ls", dtype=torch.float64)
    t = 0.7
    abar = abar_cosine_legacy(t)
    expected = beta(t) * abar * 24 / (2 * (1 - abar))
    torch.testing.assert_close(ode.divergence(m, x, t), torch.full((2,), expected, dtype=torch.float64))
    with pytest.raises(ValueError, match="coordinates_per_call must be a positive int"):
        ode.divergence(m, x, t, coordinates_per_call=0)


def test_log_likelihood_of_the_ideal_machine_converges_to_the_exact_density():
    """IS's probability flow is that of p_t = mean_phi N(sqrt(abar) phi, (1 - abar) I): started from the exact p_0.9,
    the log-likelihood at t = 0.2 is the exact log p_0.2, up to Heun's error, which falls 4x per halved step."""
    train, _, noise = small_problem(2612, N=6, C=1, H=3, W=3)
    m = ScoreMachine(train, machine="is", dtype=torch.float64)

    def mixture(t):
        abar = abar_cosine_legacy(t)

        def log_density(z):
            d2 = ((z[:, None] - math.sqrt(abar) * train[None]) ** 2).flatten(2).sum(-1)
            normaliser = math.log(len(train)) + 4.5 * math.log(2 * math.pi * (1 - abar))
            return torch.logsumexp(-d2 / (2 * (1 - abar)), dim=1) - normaliser

        return log_density

    abar = abar_cosine_legacy(0.2)
    x = math.sqrt(abar) * train[:2] + math.sqrt(1 - abar) * noise
    exact = mixture(0.2)(x)
    errors = [
        (ode.log_likelihood(m, x, steps, t_min=0.2, t_max=0.9, prior=mixture(0.9), progress=False) - exact).abs().max()
        for steps in (8, 16)
    ]
    assert errors[1] < 0.05
    assert 3.0 < errors[0] / errors[1] < 5.0
    with pytest.raises(ValueError, match="need 0 < t_min < t_max <= 1"):
        ode.log_likelihood(m, x, 4, t_min=0.5, t_max=0.5)


def test_second_derivatives_are_refused_not_dropped():
    """The backward is not itself differentiable: create_graph=True raises instead of treating the Jacobian as a
    constant (which would give silently wrong Hessians)."""
    train, _, x = small_problem(2613)
    m = ScoreMachine(train, machine="els", padding="zeros", dtype=torch.float64)
    x.requires_grad_()
    with pytest.raises(NotDifferentiable, match="second derivatives"):
        torch.autograd.grad(m.score(x, 0.5, 3).sum(), x, create_graph=True)
    with pytest.raises(NotDifferentiable, match="second derivatives"):
        torch.autograd.functional.hessian(lambda z: m.denoise(z, 0.5, 3).square().sum(), x[:1])


def test_refusal_names_the_backend_before_any_work():
    """Top-k is refused by name too, whether or not FAISS could run it here; exact backends pass."""
    check_differentiable("torch")
    check_differentiable("auto")
    with pytest.raises(NotDifferentiable, match="'topk'"):
        check_differentiable("topk")


def test_softmax_reduce_itself_differentiates_on_the_cpu_kernel(cpu_ext):
    """The core function, called directly with queries that require grad: the compiled kernel's values are no
    longer detached; their gradient is the torch path's within 16 eps32 of its largest entry (the same backward;
    only the two float32 forwards' normalisers differ; measured 1.3 eps32)."""
    train, _, x = small_problem(2614, dtype=torch.float32, N=7)
    positions = group_sets(4, 3, 3, "circular", "els")[0]
    dictionary = PatchDictionary(train, 3, "circular", positions)
    from elsfast.reduce.patches import extract_patches

    queries = extract_patches(x, 3, "circular", positions).reshape(1, -1, 18)
    upstream = torch.randn(1, queries.shape[1], 2, generator=torch.Generator().manual_seed(2615))
    grads = []
    for backend in ("cpu", "torch"):
        q = queries.clone().requires_grad_()
        r = softmax_reduce(q, dictionary, abar=0.5, backend=backend)
        assert r.values.requires_grad and r.backend == backend
        (r.values * upstream).sum().backward()
        grads.append(q.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=16 * EPS32 * grads[1].abs().max().item())


@pytest.mark.parametrize(("machine", "padding"), [("els", "zeros"), ("es", "circular")])
def test_gradient_is_the_same_with_provenance(machine, padding):
    """With provenance the forward reduces over distinct keys with their counts: the normaliser, and so the
    gradient, is the same."""
    train, _, x = small_problem(2616)
    m = ScoreMachine(train, machine=machine, padding=padding, dtype=torch.float64)
    grads = []
    for provenance in (True, False):
        xs = x.clone().requires_grad_()
        out = m.denoise(xs, 0.5, 3, return_provenance=provenance)
        (out[0] if provenance else out).square().sum().backward()
        grads.append(xs.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)
