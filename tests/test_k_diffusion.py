"""k-diffusion's `ELSDenoiser` and `get_sigmas_elsfast` (`elsfast.integrations.k_diffusion`).

These tests live apart from the diffusers ones (tests/test_diffusers.py) so that one broken library cannot take
the other's tests down. k-diffusion is not installed here: `pip install k-diffusion` replaces torch (it pulls a
CUDA torch, torchvision, scipy, ...), and without its dependencies it does not import. The tests therefore drive
`ELSDenoiser` with `sample_euler` below, a copy of k-diffusion's `sample_euler` algorithm (Karras et al. 2022,
Alg. 2 without churn: d = (x - D(x, sigma)) / sigma; x += d * (sigma_next - sigma)), and use k-diffusion's own
when it imports (missing or broken alike: `elsfast.integrations.optional_import`).
"""

import math

import pytest
import torch

import elsfast
from elsfast.common.schedules import abar_cosine_legacy
from elsfast.integrations import OPTIONAL_LIBRARIES, optional_import
from elsfast.integrations.k_diffusion import ELSDenoiser, get_sigmas_elsfast

F64 = torch.float64

k_diffusion, K_DIFFUSION_UNAVAILABLE = optional_import(*OPTIONAL_LIBRARIES["k-diffusion"])

if k_diffusion is not None:
    sample_euler = k_diffusion.sampling.sample_euler
else:  # k-diffusion's algorithm (sampling.sample_euler with s_churn = 0)

    def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x


pytestmark = pytest.mark.usefixtures("one_thread")


def _machine(dtype=torch.float32, n=8, size=8, labels=None):
    images = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    return elsfast.ScoreMachine(images, labels, dtype=dtype)


def test_elsdenoiser_is_the_variance_exploding_machine():
    m = _machine(F64)
    den = ELSDenoiser(m, patch_size=5)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    sigma = 1.7
    abar = 1 / (1 + sigma**2)
    expected = m.denoise(x * math.sqrt(abar), abar, 5)
    for s in (sigma, torch.tensor(sigma), torch.full((3,), sigma)):
        torch.testing.assert_close(den(x, s), expected)
    # unequal sigmas are evaluated per unique value
    sigmas = torch.tensor([0.5, 3.0, 0.5])
    out = den(x, sigmas)
    for b, s in enumerate(sigmas.tolist()):
        torch.testing.assert_close(out[b : b + 1], den(x[b : b + 1], s))
    for bad in (torch.tensor([1.0, 2.0]), 0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            den(x, bad)


def test_elsdenoiser_labels_and_patch_sizes():
    m = _machine(F64, labels=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=F64)
    seen = []
    den = ELSDenoiser(m, patch_size=lambda sigma: seen.append(sigma) or 3)
    out = den(x, torch.tensor([1.0, 2.0]), class_labels=torch.tensor([1, 0]))
    assert sorted(seen) == [1.0, 2.0]
    torch.testing.assert_close(out[1:], den(x[1:], 2.0, class_labels=0))
    # a calibrated name is indexed by the equivalent time t of the schedule
    named = ELSDenoiser(m, patch_size="MNIST_UNet_zeros")
    table = elsfast.reference_scales()["MNIST_UNet_zeros"]
    abar = abar_cosine_legacy(0.35)
    sigma = math.sqrt((1 - abar) / abar)
    assert named.t_of_sigma(sigma) == pytest.approx(0.35)
    torch.testing.assert_close(named(x, sigma, 1), m.denoise(x * math.sqrt(abar), abar, table[7], torch.tensor([1, 1])))
    assert named.sigma_max > 50 and 0 < named.sigma_min < 1e-2
    assert named.to(torch.float32) is named and named.machine.dtype == torch.float32 and m.dtype == F64  # a copy


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_euler_with_elsfast_sigmas_reproduces_elsfast_sample(dtype, tol):
    """Euler in sigma on elsfast's grid is the DDIM sampler: from noise * sqrt(1 + sigma_max^2) (VP noise in VE
    units) it returns elsfast.sample's images from the same noise, in the machine's dtype."""
    m = _machine(dtype)
    steps = 12
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=dtype)
    sigmas = get_sigmas_elsfast(steps, dtype=m.dtype)
    assert sigmas[-1] == 0 and len(sigmas) == steps
    x = noise * math.sqrt(1 + sigmas[0].item() ** 2)
    out = sample_euler(ELSDenoiser(m, patch_size="MNIST_ResNet_zeros"), x, sigmas, disable=True)
    ref = elsfast.sample(m, 3, steps=steps, noise=noise, patch_size="MNIST_ResNet_zeros", progress=False)
    assert out.dtype == dtype
    assert (out - ref).abs().max().item() < tol


def test_get_sigmas_elsfast_takes_the_machine_dtype():
    """`get_sigmas_elsfast(steps, machine=m)` returns m's dtype and device, so k-diffusion's loop stays in it."""
    m = _machine(torch.float32)
    sigmas = get_sigmas_elsfast(6, machine=m)
    assert sigmas.dtype == torch.float32 and sigmas.device == m.device
    torch.testing.assert_close(sigmas, get_sigmas_elsfast(6, dtype=F64).float())
    assert get_sigmas_elsfast(6, machine=m.to(dtype=F64)).dtype == F64
    with pytest.raises(ValueError, match="not both"):
        get_sigmas_elsfast(6, dtype=F64, machine=m)


def test_sample_dpmpp_2m_on_a_karras_schedule():
    """The recipe of docs/guide.md: Karras sigmas between the denoiser's sigma_min and sigma_max, DPM-Solver++(2M).
    Run with k-diffusion's own functions when it imports, else with copies of their algorithms (Karras et al.
    2022 eq. 5, rho = 7; Lu et al. 2022 DPM-Solver++(2M)); the result is a denoised image: finite, within the
    training images' range, and the sampler's final x0 prediction."""
    if k_diffusion is not None:
        get_sigmas_karras = k_diffusion.sampling.get_sigmas_karras
        sample_dpmpp_2m = k_diffusion.sampling.sample_dpmpp_2m
    else:

        def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
            ramp = torch.linspace(0, 1, n, dtype=F64)
            min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
            sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
            return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)

        def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
            extra_args = {} if extra_args is None else extra_args
            s_in = x.new_ones([x.shape[0]])
            t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
            old_denoised = None
            for i in range(len(sigmas) - 1):
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
                h = t_next - t
                if old_denoised is None or sigmas[i + 1] == 0:
                    x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
                else:
                    r = (t - t_fn(sigmas[i - 1])) / h
                    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                    x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
                old_denoised = denoised
            return x

    m = _machine(F64, labels=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    den = ELSDenoiser(m, patch_size="MNIST_ResNet_zeros")
    sigmas = get_sigmas_karras(8, den.sigma_min, den.sigma_max).to(F64)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=F64) * sigmas[0]
    seen = []
    out = sample_dpmpp_2m(
        lambda x, s, **kw: seen.append(den(x, s, **kw)) or seen[-1],
        x,
        sigmas,
        extra_args={"class_labels": torch.tensor([1, 0])},
        disable=True,
    )
    assert len(seen) == 8 and out.dtype == F64
    torch.testing.assert_close(out, seen[-1])  # the last step (to sigma = 0) returns the x0 prediction
    assert out.min() >= -1 - 1e-9 and out.max() <= 1 + 1e-9
