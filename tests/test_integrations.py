"""Adapters to other libraries (`elsfast.integrations`): diffusers' `ELSUNet` and k-diffusion's `ELSDenoiser`.

The diffusers tests run the real diffusers package (`pip install 'elsfast[diffusers]'`) and are skipped, with the
import error as the reason, only where it cannot be imported. The adapters' own conventions are tested without it.

k-diffusion is not installed here: `pip install k-diffusion` replaces torch (it pulls a CUDA torch, torchvision,
scipy, ...), and without its dependencies it does not import. The k-diffusion tests therefore drive `ELSDenoiser`
with `sample_euler` below, a copy of k-diffusion's `sample_euler` algorithm (Karras et al. 2022, Alg. 2 without
churn: d = (x - D(x, sigma)) / sigma; x += d * (sigma_next - sigma)), and use k-diffusion's own when it imports.
"""

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import elsfast
from elsfast.integrations.diffusers import ELSUNet, ELSUNetOutput, ddim_scheduler_config
from elsfast.integrations.k_diffusion import ELSDenoiser, get_sigmas_elsfast
from elsfast.schedules import abar_cosine, abar_cosine_legacy

try:
    import diffusers
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    DIFFUSERS_SKIP = ""
except ImportError as err:  # pragma: no cover - the skip reason
    DIFFUSERS_SKIP = f"diffusers cannot be imported ({err}); pip install 'elsfast[diffusers]'"

needs_diffusers = pytest.mark.skipif(bool(DIFFUSERS_SKIP), reason=DIFFUSERS_SKIP)

try:
    from k_diffusion.sampling import sample_euler
except ImportError:  # k-diffusion's algorithm (sampling.sample_euler with s_churn = 0)

    def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            d = (x - denoised) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x


F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _machine(dtype=torch.float32, n=8, size=8, labels=None, machine="els"):
    images = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    return elsfast.ScoreMachine(images, labels, machine=machine, dtype=dtype)


def _scheduler(n=10):
    """A stand-in with a scheduler's attributes, for tests that do not need diffusers."""
    abar = torch.tensor([abar_cosine_legacy((j + 1) / n) for j in range(n)], dtype=torch.float32)
    return SimpleNamespace(alphas_cumprod=abar, config={"num_train_timesteps": n, "clip_sample": False})


# ---------------------------------------------------------------- ELSUNet conventions (no diffusers needed)


def test_module_imports_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import torch, elsfast\n"
        "from types import SimpleNamespace\n"
        "from elsfast.integrations.diffusers import ELSUNet, ELSUNetOutput\n"
        "m = elsfast.ScoreMachine(torch.rand(2, 1, 4, 4) * 2 - 1)\n"
        "s = SimpleNamespace(alphas_cumprod=torch.linspace(0.99, 0.01, 10), config={})\n"
        "out = ELSUNet(m, s)(torch.randn(1, 1, 4, 4), 3)\n"
        "assert type(out) is ELSUNetOutput, type(out)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_elsunet_returns_the_machine_epsilon():
    m = _machine()
    sched = _scheduler(10)
    unet = ELSUNet(m, sched, patch_size=5)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = m.eps(x, sched.alphas_cumprod[4].item(), 5)
    for timestep in (4, torch.tensor(4), torch.tensor([4, 4, 4]), 4.0):
        out = unet(x, timestep)
        assert isinstance(out, diffusers_output_class())
        torch.testing.assert_close(out.sample, expected)
    (eps,) = unet(x, 4, return_dict=False)
    torch.testing.assert_close(eps, expected)
    assert unet(x.double(), 4).sample.dtype == F64  # the output takes the input's dtype
    assert unet.config.sample_size == 8 and unet.config.in_channels == unet.config.out_channels == 1
    assert unet.dtype == torch.float32 and unet.device == torch.device("cpu")
    assert list(unet.parameters()) == []


def diffusers_output_class():
    if DIFFUSERS_SKIP:
        return ELSUNetOutput
    from diffusers.models.unets.unet_2d import UNet2DOutput

    return UNet2DOutput


def test_elsunet_rejects_bad_timesteps_and_schedulers():
    unet = ELSUNet(_machine(), _scheduler(10))
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match="must be equal"):
        unet(x, torch.tensor([4, 5, 4]))
    with pytest.raises(ValueError, match="one per sample"):
        unet(x, torch.tensor([4, 4]))
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        unet(x, 10)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        ELSUNet(_machine(), object())
    bad = _scheduler(10)
    bad.config["prediction_type"] = "v_prediction"
    with pytest.raises(ValueError, match="epsilon"):
        ELSUNet(_machine(), bad)
    clipping = _scheduler(10)
    clipping.config["clip_sample"] = True
    with pytest.warns(UserWarning, match="clip_sample=False"):
        ELSUNet(_machine(), clipping)
    with pytest.raises(ValueError, match="unknown calibrated"):
        ELSUNet(_machine(), _scheduler(10), patch_size="nope")


def test_elsunet_patch_size_schedule_and_fractional_timesteps():
    m = _machine()
    seen = []
    unet = ELSUNet(m, _scheduler(20), patch_size=lambda t: seen.append(t) or 3)
    x = torch.randn(2, 1, 8, 8)
    unet(x, 9)
    assert seen == [0.5]  # t = (timestep + 1) / num_train_timesteps: alphas_cumprod[9] = abar(10 / 20)
    named = ELSUNet(m, _scheduler(20), patch_size="MNIST_UNet_zeros")
    table = elsfast.reference_scales()["MNIST_UNet_zeros"]
    sched = named.alphas_cumprod
    for j in (0, 8, 19):
        torch.testing.assert_close(named(x, j).sample, m.eps(x, sched[j].item(), table[min(19, j + 1)]))
    # a fractional timestep interpolates sigma = sqrt((1 - abar) / abar) linearly, like diffusers' Euler schedulers
    s0, s1 = (math.sqrt((1 - a) / a) for a in sched[4:6].tolist())
    assert unet.abar(4.25) == pytest.approx(1 / (1 + (0.75 * s0 + 0.25 * s1) ** 2))


def test_elsunet_to_moves_and_converts_the_machine():
    m = _machine()
    unet = ELSUNet(m, _scheduler(10))
    assert unet.to(F64) is unet and m.dtype == F64 and unet.dtype == F64
    unet.to("cpu", torch.float16)  # half precision is ignored: machines compute in float32 or float64
    assert m.dtype == F64
    unet.float()
    assert m.dtype == torch.float32 and m.images.dtype == torch.float32
    assert unet.cpu().device == torch.device("cpu")


# ---------------------------------------------------------------- the real diffusers


@needs_diffusers
def test_ddim_pipeline_runs_end_to_end():
    """A stock DDIMPipeline with a stock cosine scheduler (1000 training timesteps) and an ELS machine."""
    m = _machine()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True)
    pipe = DDIMPipeline(unet=ELSUNet(m, scheduler, patch_size="MNIST_ResNet_zeros"), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to("cpu")
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=8, output_type="np")
    images = images.images
    assert images.shape == (3, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.05  # not a constant image
    pt = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="pt")
    assert pt.images.shape == (2, 1, 8, 8)


@needs_diffusers
def test_ddpm_pipeline_runs_end_to_end():
    scheduler = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    pipe = DDPMPipeline(unet=ELSUNet(_machine(), scheduler), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np")
    assert images.images.shape == (2, 8, 8, 1)


@needs_diffusers
@pytest.mark.parametrize("schedule", ["cosine-legacy", "cosine"])
@pytest.mark.parametrize("steps, substeps", [(20, 1), (10, 3), (2, 4)])
def test_ddim_scheduler_config_visits_elsfast_grid(schedule, steps, substeps):
    abar_of = {"cosine-legacy": abar_cosine_legacy, "cosine": abar_cosine}[schedule]
    sched = DDIMScheduler(**ddim_scheduler_config(steps, schedule, substeps))
    sched.set_timesteps(steps - 1)
    unet = ELSUNet(_machine(), sched)
    timesteps = sched.timesteps.tolist()
    assert timesteps == [i * substeps - 1 for i in range(steps - 1, 0, -1)]
    for i, j in zip(range(steps - 1, 0, -1), timesteps, strict=True):
        assert unet.time(j) == pytest.approx(i / steps, abs=1e-12)
        assert sched.alphas_cumprod[j].item() == pytest.approx(abar_of(i / steps), rel=1e-6)
    # the last step lands on abar = 1
    assert timesteps[-1] - sched.config.num_train_timesteps // sched.num_inference_steps < 0
    assert sched.final_alpha_cumprod.item() == 1.0


@needs_diffusers
@pytest.mark.parametrize(
    "dtype, steps, substeps, patch_size, tol",
    [
        (F64, 20, 1, "MNIST_UNet_zeros", 1e-4),
        (F64, 12, 3, 5, 1e-4),
        (torch.float32, 20, 5, "MNIST_ResNet_zeros", 2e-3),
    ],
)
def test_ddim_pipeline_reproduces_elsfast_sample(dtype, steps, substeps, patch_size, tol):
    """With `ddim_scheduler_config` and num_inference_steps = steps - 1, DDIMPipeline gives elsfast.sample's images
    from the same generator. diffusers keeps alphas_cumprod in float32 (relative rounding ~6e-8); the sampler
    amplifies that perturbation, and float32 machines add the rounding of the scheduler's x0 reconstruction at
    abar ~ 1e-4. Measured worst over 10 seeds x 4 images, in [-1, 1] units: 2.5e-5 (float64 machine), 4.9e-4
    (float32); the tolerances leave a factor 4. The next test shows that with exact alphas the match is exact."""
    m = _machine(dtype)
    scheduler = DDIMScheduler(**ddim_scheduler_config(steps, "cosine-legacy", substeps))
    pipe = DDIMPipeline(unet=ELSUNet(m, scheduler, patch_size=patch_size), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=4, generator=torch.Generator().manual_seed(3), num_inference_steps=steps - 1, output_type="pt"
    )
    # the pipeline draws its noise in the model's dtype; elsfast.sample(seed=...) always draws float32 noise
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=m.dtype)
    ref = elsfast.sample(m, 4, steps=steps, patch_size=patch_size, noise=noise)
    # the pipeline returns (x / 2 + 0.5).clamp(0, 1)
    assert (out.images.to(F64) - (ref.to(F64) / 2 + 0.5).clamp(0, 1)).abs().max().item() < tol / 2


@needs_diffusers
def test_ddim_scheduler_loop_with_exact_alphas_is_elsfast_sample():
    """The scheduler loop by hand, with the same noise and float64 alphas_cumprod (instead of diffusers' float32
    ones) in both the scheduler and the ELSUNet: the result equals elsfast.sample to float64 rounding."""
    steps, substeps = 10, 2
    m = _machine(F64)
    scheduler = DDIMScheduler(**ddim_scheduler_config(steps, "cosine-legacy", substeps))
    n = scheduler.config.num_train_timesteps
    scheduler.alphas_cumprod = torch.tensor([abar_cosine_legacy((j + 1) / n) for j in range(n)], dtype=F64)
    unet = ELSUNet(m, scheduler, patch_size=lambda t: 3 if t < 0.5 else 5)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    scheduler.set_timesteps(steps - 1)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    ref = elsfast.sample(m, 3, steps=steps, noise=noise, patch_size=lambda t: 3 if t < 0.5 else 5, progress=False)
    assert (x - ref).abs().max().item() < 1e-12


# ---------------------------------------------------------------- k-diffusion


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
    assert named.to(torch.float32) is named and m.dtype == torch.float32


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_euler_with_elsfast_sigmas_reproduces_elsfast_sample(dtype, tol):
    """Euler in sigma on elsfast's grid is the DDIM sampler: from noise * sqrt(1 + sigma_max^2) (VP noise in VE
    units) it returns elsfast.sample's images from the same noise."""
    m = _machine(dtype)
    steps = 12
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=dtype)
    sigmas = get_sigmas_elsfast(steps)
    assert sigmas[-1] == 0 and len(sigmas) == steps
    x = noise * math.sqrt(1 + sigmas[0].item() ** 2)
    out = sample_euler(ELSDenoiser(m, patch_size="MNIST_ResNet_zeros"), x, sigmas, disable=True)
    ref = elsfast.sample(m, 3, steps=steps, noise=noise, patch_size="MNIST_ResNet_zeros", progress=False)
    assert (out - ref).abs().max().item() < tol


def test_diffusers_version_is_recent_enough():
    if DIFFUSERS_SKIP:
        pytest.skip(DIFFUSERS_SKIP)
    major, minor = (int(p) for p in diffusers.__version__.split(".")[:2])
    assert (major, minor) >= (0, 30)
