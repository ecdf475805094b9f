"""The probability-flow ODE (`elsfast.sampling.ode`): schedule derivatives, score and velocity against analytic
cases, and
Euler integration against the DDIM sampler."""

import math

import pytest
import torch

import elsfast
from elsfast.common.scales import patch_size_at
from elsfast.common.schedules import abar_cosine, abar_cosine_legacy, beta, t_of_abar
from elsfast.sampling import ddim_sample, ode

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n=8, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g, dtype=F64) * 2 - 1


def _noise(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("name, fn", [("cosine-legacy", abar_cosine_legacy), ("cosine", abar_cosine)])
def test_beta_is_minus_dlog_abar_and_t_of_abar_inverts(name, fn):
    for t in (0.05, 0.3, 0.6, 0.9):
        h = 1e-5
        numeric = -(math.log(fn(t + h)) - math.log(fn(t - h))) / (2 * h)
        assert beta(t, name) == pytest.approx(numeric, rel=1e-6)
        assert beta(t, lambda s: fn(s)) == pytest.approx(numeric, rel=1e-5)  # callable: finite difference
        for schedule in (name, lambda s: fn(s)):
            assert t_of_abar(fn(t), schedule) == pytest.approx(t, abs=1e-9)
    assert t_of_abar(1.0, name) == pytest.approx(0.0, abs=1e-7)
    assert t_of_abar(0.0, name) == 1.0


def test_patch_size_at():
    assert patch_size_at(5, 0.3) == 5
    assert patch_size_at(lambda t: 3 if t < 0.5 else 7, 0.7) == 7
    table = elsfast.reference_scales()["MNIST_UNet_zeros"]
    for i in range(20):
        assert patch_size_at("MNIST_UNet_zeros", i / 20) == table[i]
    assert patch_size_at("MNIST_UNet_zeros", 1.0) == table[-1]  # round(20) clipped to the last entry
    assert patch_size_at([3, 5, 7, 9], 0.5) == 7  # a per-step list of length n: entry i at t = i / n
    with pytest.raises(ValueError, match="unknown calibrated"):
        patch_size_at("nope", 0.5)


def test_score_is_the_gradient_of_the_log_density_for_the_ideal_machine():
    """IS is the exact posterior mean of the Gaussian mixture p_t = mean_phi N(sqrt(abar) phi, (1 - abar) I), so its
    score must equal grad log p_t (autograd, float64)."""
    images = _images(6, 4)
    m = elsfast.ScoreMachine(images, machine="is", dtype=F64)
    x = _noise((3, 1, 4, 4))
    for t in (0.2, 0.5, 0.8):
        abar = abar_cosine_legacy(t)
        xr = x.clone().requires_grad_(True)
        d2 = ((xr[:, None] - math.sqrt(abar) * images[None]) ** 2).flatten(2).sum(-1)
        torch.logsumexp(-d2 / (2 * (1 - abar)), dim=1).sum().backward()
        s = ode.score(m, x, t)
        torch.testing.assert_close(s, xr.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, m.score(x, abar, 3))


def test_velocity_on_a_one_image_training_set_is_the_analytic_flow():
    """With one training image phi, LS gives D = phi exactly, and x(t) = sqrt(abar) phi + sqrt(1 - abar) eps solves
    the probability-flow ODE for every eps: the velocity must be its time derivative (central difference)."""
    phi = _images(1, 5)
    m = elsfast.ScoreMachine(phi, machine="ls", dtype=F64)
    eps = _noise((2, 1, 5, 5))
    for schedule, fn in (("cosine-legacy", abar_cosine_legacy), ("cosine", abar_cosine)):
        path = lambda t, fn=fn: math.sqrt(fn(t)) * phi + math.sqrt(1 - fn(t)) * eps  # noqa: E731
        for t in (0.1, 0.5, 0.95):
            x, abar, h = path(t), fn(t), 1e-6
            v = ode.velocity(m, x, t, schedule=schedule)
            torch.testing.assert_close(v, (path(t + h) - path(t - h)) / (2 * h), rtol=1e-6, atol=1e-6)
            s = ode.score(m, x, t, schedule=schedule)
            torch.testing.assert_close(s, (math.sqrt(abar) * phi - x) / (1 - abar))
            torch.testing.assert_close(v, -0.5 * beta(t, schedule) * (x + s))
    # Euler keeps D = phi at every step, so the result is phi exactly
    out = ode.euler_sample(m, _noise((2, 1, 5, 5)), 10, progress=False)
    torch.testing.assert_close(out, phi.expand(2, -1, -1, -1))


class _Reached(Exception):
    pass


def test_euler_converges_to_the_ddim_sampler():
    """Euler on dx/dt and the DDIM sampler discretise the same ODE: from the same noise at t = 0.9, Euler's state at
    t = 0.2 approaches a fine DDIM run (800 steps, stopped at t = 0.2) as its steps grow (first order).

    The comparison stops at t = 0.2 (abar ~ 0.91): below it an ELS flow commits pixels to patches and is so
    sensitive that even DDIM with 1000 and 4000 steps can end in different patch mosaics at t = 0.
    """
    m = elsfast.ScoreMachine(_images(8, 8), machine="els", padding="zeros", dtype=F64)
    noise = _noise((2, 1, 8, 8))
    n_ref, t0, t1 = 800, 0.9, 0.2
    reached = {}

    def stop_at_t1(info):
        if info["i"] - 1 == round(t1 * n_ref):
            reached["x"] = info["x"]
            raise _Reached

    with pytest.raises(_Reached):
        ddim_sample(
            lambda x, abar, i: m.denoise(x, abar, 3),
            noise,
            steps=n_ref,
            start=round(t0 * n_ref),
            progress=False,
            callback=stop_at_t1,
        )
    errors = {}
    for steps in (50, 400):
        last = {}
        x0 = ode.euler_sample(m, noise, steps, t_start=t0, t_min=t1, progress=False, callback=last.update)
        assert last["i"] == steps - 1
        torch.testing.assert_close(x0, m.denoise(last["x"], abar_cosine_legacy(t1), 3))
        errors[steps] = (last["x"] - reached["x"]).abs().max().item()
    assert errors[400] < errors[50] / 3, errors
    assert errors[400] < 1e-2, errors


def test_euler_sample_arguments_and_labels():
    images = _images(4, 6)
    m = elsfast.ScoreMachine(images, torch.tensor([0, 0, 1, 1]), machine="els", dtype=F64)
    x = _noise((2, 1, 6, 6))
    out = ode.euler_sample(m, x, 20, labels=1, patch_size=lambda t: 3 if t < 0.5 else 5, progress=False)
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="t_min"):
        ode.euler_sample(m, x, 10, t_min=0.5, t_start=0.4)
    with pytest.raises(ValueError, match="steps"):
        ode.euler_sample(m, x, 0)
    with pytest.raises(ValueError, match="strictly between"):
        ode.euler_sample(m, x, 10, schedule=lambda t: 1 - t, progress=False)  # abar(1) = 0
    # the improved cosine's abar(1) is 4e-33 in floating point; beta * sqrt(abar) stays bounded there
    assert torch.isfinite(ode.euler_sample(m, x, 10, schedule="cosine", progress=False)).all()
