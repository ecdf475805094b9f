"""diffusers' `ELSUNet` and `ELSPipeline` (`elsfast.integrations.diffusers`).

The diffusers tests run the real diffusers package (`pip install 'elsfast[diffusers]'`) and are skipped, with the
reason, only where it cannot be used: missing, or installed but broken (`DIFFUSERS_UNAVAILABLE`, e.g. `RuntimeError:
operator torchvision::nms does not exist` beside a torchvision built for another torch). The model's own
conventions are tested without it. The k-diffusion tests live in tests/test_k_diffusion.py.
"""

import logging
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import elsfast
from elsfast.common.schedules import abar_cosine, abar_cosine_legacy
from elsfast.integrations.diffusers import (
    DIFFUSERS_UNAVAILABLE,
    TRAINING_SET_NAME,
    ELSUNet,
    ELSUNetOutput,
    ddim_scheduler_config,
)

if not DIFFUSERS_UNAVAILABLE:
    import diffusers
    from diffusers import (
        DDIMPipeline,
        DDIMScheduler,
        DDPMPipeline,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    from elsfast.integrations.diffusers import ELSPipeline

DIFFUSERS_SKIP = f"diffusers cannot be used ({DIFFUSERS_UNAVAILABLE}); pip install 'elsfast[diffusers]'"
needs_diffusers = pytest.mark.skipif(bool(DIFFUSERS_UNAVAILABLE), reason=DIFFUSERS_SKIP)

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
    if DIFFUSERS_UNAVAILABLE:
        return ELSUNetOutput
    from diffusers.models.unets.unet_2d import UNet2DOutput

    return UNet2DOutput


def test_elsunet_rejects_bad_timesteps_and_schedulers():
    unet = ELSUNet(_machine(), _scheduler(10))
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match="one per sample"):
        unet(x, torch.tensor([4, 4]))
    with pytest.raises(ValueError, match=r"lie in \[0, 9\]"):
        unet(x, 10)
    with pytest.raises(ValueError, match=r"lie in \[0, 9\].*\[-1.0\]"):
        unet(x, torch.tensor([4, -1, 4]))
    with pytest.raises(TypeError, match="unsupported arguments"):
        unet(x, 4, encoder_hidden_states=x)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        ELSUNet(_machine(), object())
    bad = _scheduler(10)
    bad.config["prediction_type"] = "flow_prediction"
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
    sched = named.scheduler.alphas_cumprod
    for j in (0, 8, 19):
        torch.testing.assert_close(named(x, j).sample, m.eps(x, sched[j].item(), table[min(19, j + 1)]))
    # a fractional timestep interpolates sigma = sqrt((1 - abar) / abar) linearly, like diffusers' Euler schedulers
    s0, s1 = (math.sqrt((1 - a) / a) for a in sched[4:6].tolist())
    assert unet.abar(4.25) == pytest.approx(1 / (1 + (0.75 * s0 + 0.25 * s1) ** 2))


def test_elsunet_to_moves_and_converts_its_own_machine():
    m = _machine()
    unet = ELSUNet(m, _scheduler(10))
    assert unet.to(F64) is unet and unet.machine.dtype == F64 and unet.dtype == F64
    assert m.dtype == torch.float32 and m.images.dtype == torch.float32  # converted a copy: m may be shared
    unet.to("cpu", torch.float16)  # half precision: inputs and outputs only; the machine keeps its dtype
    assert unet.machine.dtype == F64 and unet.dtype == torch.float16
    unet.float()
    assert unet.machine.dtype == torch.float32 and unet.machine.images.dtype == torch.float32
    assert unet.dtype == torch.float32
    assert unet.cpu().device == torch.device("cpu")


def test_elsunet_evaluates_per_sample_timesteps():
    """A `[B]` tensor of unequal timesteps (`tensor([5, 2, 5])`) is evaluated per distinct value, with each
    sample's own noise level, patch size and class label."""
    m = _machine(labels=torch.tensor([0, 1] * 4))
    sched = _scheduler(10)
    unet = ELSUNet(m, sched, patch_size=[3, 3, 3, 5, 5, 5, 7, 7, 7, 7])
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([1, 0, 0])
    out = unet(x, torch.tensor([5, 2, 5]), class_labels=labels).sample
    for b, j in enumerate((5, 2, 5)):
        size = [3, 3, 3, 5, 5, 5, 7, 7, 7, 7][round((j + 1) / 10 * 10)]
        expected = m.eps(x[b : b + 1], sched.alphas_cumprod[j].item(), size, labels[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], expected, rtol=0, atol=0)


def test_elsunet_reads_its_scheduler_live_and_refuses_without_one():
    """No copy of the schedule: a change to the connected scheduler is followed at the next call, and a model with
    no scheduler (and no calling pipeline) refuses, saying how to connect one."""
    m = _machine()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    unet = ELSUNet(m)
    with pytest.raises(RuntimeError, match=r"pipe.unet.follow\(pipe\).*ELSUNet\(machine, scheduler\)"):
        unet(x, 3)
    sched = _scheduler(10)
    assert unet.follow(sched) is unet
    torch.testing.assert_close(unet(x, 3).sample, m.eps(x, sched.alphas_cumprod[3].item(), 3))
    sched.alphas_cumprod = sched.alphas_cumprod.flip(0)  # changed in place: followed
    torch.testing.assert_close(unet(x, 3).sample, m.eps(x, sched.alphas_cumprod[3].item(), 3))
    unet.follow(_scheduler(20))  # 20 training timesteps: timestep 15 is valid now, t = 16 / 20
    assert unet.time(15) == 0.8
    with pytest.raises(ValueError, match="num_train_timesteps=12 but 20"):
        unet.follow(SimpleNamespace(alphas_cumprod=torch.rand(20), config={"num_train_timesteps": 12}))


def test_elsunet_config_is_frozen_and_json_ready():
    unet = ELSUNet(_machine(), _scheduler(10), patch_size="MNIST_UNet_zeros")
    config = unet.config
    assert config.sample_size == 8 and config.in_channels == config.out_channels == 1
    assert config.patch_size == "MNIST_UNet_zeros"
    assert config.machine["train_sha256"] == unet.machine.fingerprint and config.machine["machine"] == "els"
    if DIFFUSERS_UNAVAILABLE:
        with pytest.raises(TypeError, match="frozen"):
            config["patch_size"] = 5
    else:  # diffusers' own config class, as every diffusers model has
        from diffusers.configuration_utils import FrozenDict

        assert isinstance(config, FrozenDict)
        assert ELSUNet.config_name == "config.json"


# ---------------------------------------------------------------- the real diffusers


@needs_diffusers
def test_ddim_pipeline_runs_end_to_end():
    """A stock DDIMPipeline with a stock cosine scheduler (1000 training timesteps) and an ELS machine."""
    m = _machine()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True)
    pipe = DDIMPipeline(unet=ELSUNet(m, patch_size="MNIST_ResNet_zeros"), scheduler=scheduler)
    pipe.unet.follow(pipe)
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
    pipe = DDPMPipeline(unet=ELSUNet(_machine()), scheduler=scheduler)
    pipe.unet.follow(pipe)
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
    pipe = DDIMPipeline(unet=ELSUNet(m, patch_size=patch_size), scheduler=scheduler)
    pipe.unet.follow(pipe)
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


def test_diffusers_version_is_recent_enough():
    if DIFFUSERS_UNAVAILABLE:
        pytest.skip(DIFFUSERS_SKIP)
    major, minor = (int(p) for p in diffusers.__version__.split(".")[:2])
    assert (major, minor) >= (0, 30)


# ---------------------------------------------------------------- following the pipeline's scheduler


def _loop(unet, scheduler, noise, steps):
    """The DDIM loop by hand (no pipeline): the reference for what a pipeline must produce. The timesteps are
    passed as numbers, so a model connected to another scheduler runs on that scheduler's noise levels."""
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t.item()).sample, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@needs_diffusers
@pytest.mark.parametrize("change", [{"beta_schedule": "linear"}, {"num_train_timesteps": 500}])
def test_swapped_scheduler_is_followed_or_refused(change):
    """diffusers' idiom `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, ...)` (another
    schedule, or 500 training timesteps instead of 1000): ELSPipeline connects its current scheduler at every call,
    so the images are those of a hand-written loop with the new scheduler; a stock DDIMPipeline whose model is still
    connected to the old scheduler is refused (its timesteps come from another table) until `unet.follow`."""
    m = _machine()
    old = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    new = DDIMScheduler.from_config(old.config, **change)
    expected = _loop(ELSUNet(m, new), new, noise, 6)
    stale = _loop(ELSUNet(m, old), new, noise, 6)  # a model that kept the old schedule, driven by the new one
    assert (expected - stale).abs().max() > 0.05

    def run(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe(batch_size=2, generator=g, num_inference_steps=6, output_type="pt").images

    els = ELSPipeline(unet=ELSUNet(m, old), scheduler=old)
    els.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(els), _loop(ELSUNet(m, old), old, noise, 6), rtol=0, atol=1e-6)
    els.scheduler = DDIMScheduler.from_config(els.scheduler.config, **change)
    torch.testing.assert_close(run(els), expected, rtol=0, atol=1e-6)

    ddim = DDIMPipeline(unet=ELSUNet(m, old), scheduler=old)  # DDIMPipeline keeps a copy of `old`
    ddim.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match=r"another timesteps table.*pipe.unet.follow\(pipe\)"):
        run(ddim)
    ddim.unet.follow(ddim)
    assert ddim.unet.scheduler is ddim.scheduler
    ddim.scheduler = DDIMScheduler.from_config(ddim.scheduler.config, **change)
    torch.testing.assert_close(run(ddim), expected, rtol=0, atol=1e-6)
    ddim.scheduler = DDIMScheduler.from_config(ddim.scheduler.config, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        run(ddim)


@needs_diffusers
def test_stock_pipeline_without_a_connected_scheduler_says_how_to_connect_one():
    """ELSUNet(machine) with no scheduler of its own refuses in a stock pipeline, saying how to connect one (it
    never looks for the pipeline on the call stack); connected, it runs the pipeline's loop."""
    m = _machine()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, num_train_timesteps=200)
    pipe = DDIMPipeline(unet=ELSUNet(m), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match=r"does not know which scheduler.*pipe.unet.follow\(pipe\)"):
        pipe(batch_size=2, num_inference_steps=5)
    with pytest.raises(ValueError, match="does not hold this ELSUNet"):
        ELSUNet(m).follow(pipe)
    pipe.unet.follow(pipe)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="pt")
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.images, _loop(ELSUNet(m, scheduler), scheduler, noise, 5), rtol=0, atol=1e-6)
    bad = DDIMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        pipe.unet.follow(bad)


# ---------------------------------------------------------------- save and load


def _dataset_machine():
    return elsfast.ScoreMachine.from_dataset("mnist-embedded", limit=6, dtype=F64)


@needs_diffusers
def test_pipeline_save_and_load_gives_equal_images(tmp_path, caplog):
    """`pipe.save_pretrained(d)` saves the unet (no "cannot be saved", no `[null, null]`), without the training
    images; `DDIMPipeline.from_pretrained(d)` reloads the dataset, checks its SHA-256 and gives the same images."""
    m = _dataset_machine()
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True)
    pipe = DDIMPipeline(unet=ELSUNet(m, patch_size="MNIST_ResNet_zeros"), scheduler=scheduler)
    pipe.unet.follow(pipe)
    pipe.set_progress_bar_config(disable=True)

    def run(p):
        g = torch.Generator().manual_seed(2)
        return p(batch_size=2, generator=g, num_inference_steps=4, output_type="pt").images

    expected = run(pipe)
    with caplog.at_level(logging.WARNING):
        pipe.save_pretrained(tmp_path)
    assert "cannot be saved" not in caplog.text
    index = (tmp_path / "model_index.json").read_text()
    assert '"elsfast.integrations.diffusers",\n    "ELSUNet"' in index
    files = sorted(p.name for p in (tmp_path / "unet").iterdir() if not p.name.startswith("."))
    assert files == ["config.json"]  # the configuration, not the data (hidden files: write bookkeeping)
    assert (tmp_path / "unet" / "config.json").stat().st_size < 4096
    loaded = DDIMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    loaded.unet.follow(loaded)
    assert type(loaded.unet) is ELSUNet and loaded.unet.machine.fingerprint == m.fingerprint
    assert loaded.unet.patch_size == "MNIST_ResNet_zeros" and loaded.unet.machine.dtype == F64
    torch.testing.assert_close(run(loaded), expected, rtol=0, atol=0)


@needs_diffusers
def test_elspipeline_save_and_load_with_a_copy_of_the_training_set(tmp_path):
    """A machine built from tensors records no dataset: its training set is saved only when asked
    (save_training_set=True); the copy is checked against the recorded SHA-256 when loaded."""
    m = _machine(F64, labels=torch.tensor([0, 1] * 4))
    pipe = ELSPipeline(
        unet=ELSUNet(m, patch_size=5, save_training_set=True), scheduler=DDPMScheduler(50, clip_sample=False)
    )
    pipe.set_progress_bar_config(disable=True)

    def run(p):
        g = torch.Generator().manual_seed(3)
        return p(class_labels=[1, 0], generator=g, num_inference_steps=5, output_type="pt").images

    expected = run(pipe)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / TRAINING_SET_NAME).is_file()
    loaded = ELSPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded), expected, rtol=0, atol=0)
    # a changed training set is refused
    data = torch.load(tmp_path / "unet" / TRAINING_SET_NAME, weights_only=True)
    data["images"][0, 0, 0, 0] = -data["images"][0, 0, 0, 0]
    torch.save(data, tmp_path / "unet" / TRAINING_SET_NAME)
    with pytest.raises(ValueError, match="training set differs"):
        ELSPipeline.from_pretrained(tmp_path)


@needs_diffusers
def test_pipeline_save_pretrained_honours_save_training_set(tmp_path):
    """`pipe.save_pretrained(d, save_training_set=...)` decides whether the copy is written (a dataset machine
    saves only its reference by default), and refuses False for a machine that records no dataset."""
    unet = ELSUNet(_dataset_machine(), patch_size=3)
    pipe = ELSPipeline(unet=unet, scheduler=DDPMScheduler(50, clip_sample=False))
    pipe.save_pretrained(tmp_path / "reference")
    assert not (tmp_path / "reference" / "unet" / TRAINING_SET_NAME).exists()
    pipe.save_pretrained(tmp_path / "copy", save_training_set=True)
    assert (tmp_path / "copy" / "unet" / TRAINING_SET_NAME).is_file()
    assert unet.save_training_set is None  # the call's choice only
    loaded = ELSPipeline.from_pretrained(tmp_path / "copy", root=tmp_path / "no-data")  # needs only the copy
    assert loaded.unet.machine.fingerprint == unet.machine.fingerprint
    tensors = ELSPipeline(unet=ELSUNet(_machine(F64)), scheduler=DDPMScheduler(50, clip_sample=False))
    with pytest.raises(ValueError, match="could not be reloaded"):
        tensors.save_pretrained(tmp_path / "refused", save_training_set=False)


@needs_diffusers
def test_missing_or_changed_training_sets_are_clear_errors(tmp_path):
    m = _machine(F64)
    unet = ELSUNet(m, patch_size=3)
    # a machine built from tensors: a directory without its training set could not be reloaded, so it is refused
    # at save time, before anything is written, and saved with a copy by default
    with pytest.raises(ValueError, match=r"save_training_set=False.*could not be reloaded"):
        unet.save_pretrained(tmp_path / "refused", save_training_set=False)
    assert not (tmp_path / "refused").exists()
    unet.save_pretrained(tmp_path / "tensors")
    assert (tmp_path / "tensors" / TRAINING_SET_NAME).is_file()
    assert ELSUNet.from_pretrained(tmp_path / "tensors").machine.fingerprint == m.fingerprint
    (tmp_path / "tensors" / TRAINING_SET_NAME).unlink()  # a copy lost after saving
    with pytest.raises(ValueError, match=r"records no dataset.*train_images=.*save_training_set=True"):
        ELSUNet.from_pretrained(tmp_path / "tensors")
    loaded = ELSUNet.from_pretrained(tmp_path / "tensors", train_images=m.images)
    assert loaded.machine.fingerprint == m.fingerprint and loaded.scheduler is None
    with pytest.raises(ValueError, match="training set differs"):
        ELSUNet.from_pretrained(tmp_path / "tensors", train_images=m.images.flip(0))
    # a dataset reference whose data is not there
    missing = elsfast.ScoreMachine(m.images)
    missing.source = {"dataset": "mnist", "split": "train", "pad_to": None, "limit": 8}
    ELSUNet(missing).save_pretrained(tmp_path / "dataset")
    with pytest.raises(FileNotFoundError, match=r"(?i)cannot rebuild the ELSUNet.*mnist"):
        ELSUNet.from_pretrained(tmp_path / "dataset", root=tmp_path / "no-data")
    with pytest.raises(ValueError, match="callable patch_size cannot be saved"):
        ELSUNet(m, patch_size=lambda t: 3).save_pretrained(tmp_path / "callable")
    with pytest.raises(FileNotFoundError, match="no ELSUNet config"):
        ELSUNet.from_pretrained(tmp_path / "nowhere")


# ---------------------------------------------------------------- precision, class labels, other schedulers


@needs_diffusers
def test_float16_inputs_and_outputs_with_a_float32_machine(tmp_path):
    """`torch_dtype=torch.float16` makes the model's inputs and outputs half precision while the machine computes
    in float32: eps(x16) is the float32 machine's eps of x16, rounded to float16. A float16 pipeline (whose
    scheduler then computes in float16) gives images close to the float32 ones: measured mean |difference|
    4e-4 and worst pixel 0.22 on MNIST; here the bound is on the mean."""
    m = _machine()
    ELSUNet(m, patch_size=3).save_pretrained(tmp_path)
    unet = ELSUNet.from_pretrained(tmp_path, train_images=m.images, torch_dtype=torch.float16)
    assert unet.dtype == torch.float16 and unet.machine.dtype == torch.float32
    sched = make_scheduler(10)
    unet.follow(sched)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)).half()
    eps = unet(x, 4).sample
    assert eps.dtype == torch.float16
    torch.testing.assert_close(eps, m.eps(x.float(), sched.alphas_cumprod[4].item(), 3).half(), rtol=0, atol=0)
    pipe = DDIMPipeline(unet=unet, scheduler=sched)
    unet.follow(pipe)
    pipe.set_progress_bar_config(disable=True)
    half = pipe(batch_size=4, generator=torch.Generator().manual_seed(5), num_inference_steps=9, output_type="pt")
    pipe.to(torch.float32)
    assert unet.dtype == torch.float32
    full = pipe(batch_size=4, generator=torch.Generator().manual_seed(5), num_inference_steps=9, output_type="pt")
    assert half.images.dtype == torch.float16 and full.images.dtype == torch.float32
    assert (half.images.float() - full.images).abs().mean() < 4e-3


def make_scheduler(steps):
    from elsfast.integrations.diffusers import make_ddim_scheduler

    return make_ddim_scheduler(steps)


@needs_diffusers
def test_elspipeline_class_labels_reproduce_elsfast_sample():
    """ELSPipeline passes class_labels to the machine; with make_ddim_scheduler(n) it gives
    elsfast.sample(..., labels=...)'s images from the same generator (tolerance as for DDIMPipeline)."""
    m = _machine(F64, labels=torch.tensor([0, 1] * 4))
    steps = 10
    pipe = ELSPipeline(unet=ELSUNet(m, patch_size=5), scheduler=make_scheduler(steps))
    pipe.set_progress_bar_config(disable=True)
    labels = [1, 0, 1]
    out = pipe(class_labels=labels, generator=torch.Generator().manual_seed(6), num_inference_steps=steps - 1)
    assert len(out.images) == 3  # PIL images by default
    pt = pipe(
        class_labels=labels, generator=torch.Generator().manual_seed(6), num_inference_steps=steps - 1, output_type="pt"
    ).images
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=F64)
    ref = elsfast.sample(m, 3, steps=steps, patch_size=5, labels=labels, noise=noise, progress=False)
    assert (pt - (ref / 2 + 0.5).clamp(0, 1)).abs().max().item() < 5e-5
    unconditional = elsfast.sample(m, 3, steps=steps, patch_size=5, noise=noise, progress=False)
    assert (pt - (unconditional / 2 + 0.5).clamp(0, 1)).abs().max().item() > 0.01  # the labels mattered
    one = pipe(batch_size=2, class_labels=1, num_inference_steps=3, output_type="np")
    assert one.images.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="one label or one per image"):
        pipe(batch_size=2, class_labels=[0, 1, 1])


@needs_diffusers
@pytest.mark.parametrize("scheduler_class", ["euler", "dpmsolver++"])
def test_elspipeline_runs_other_schedulers(scheduler_class):
    """Euler (fractional timesteps, scale_model_input, init_noise_sigma > 1) and DPM-Solver++ in ELSPipeline."""
    config = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
    scheduler = (
        EulerDiscreteScheduler(**config)
        if scheduler_class == "euler"
        else DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++")
    )
    pipe = ELSPipeline(unet=ELSUNet(_machine(F64)), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=8, output_type="pt")
    images = images.images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all() and images.std() > 0.05


@needs_diffusers
@pytest.mark.slow
@pytest.mark.slow_ci
def test_example_script_runs(tmp_path):
    """examples/diffusers_pipeline.py, as documented, on a small problem."""
    script = Path(__file__).resolve().parent.parent / "examples" / "diffusers_pipeline.py"
    result = subprocess.run(
        [sys.executable, str(script), "--limit", "8", "--steps", "4", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reloaded pipeline: same images" in result.stdout
    assert (tmp_path / "pipeline" / "unet" / "config.json").is_file()
    assert (tmp_path / "digits.png").is_file()


# ---------------------------------------------------------------- diffusers' rules (issue 26, item 3)

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SD_CONFIG.update(timestep_spacing="leading", steps_offset=1)  # Stable Diffusion's: the first sigma is not the max


def _sigma_scheduler(name: str, **config):
    import diffusers as d

    if name == "lms":
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    classes = {"euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler"}
    classes.update(kdpm2="KDPM2DiscreteScheduler", dpmpp="DPMSolverMultistepScheduler")
    return getattr(d, classes[name])(**config)


@needs_diffusers
@pytest.mark.parametrize("name", ["euler", "heun", "kdpm2", "lms"])
def test_elspipeline_scales_the_noise_of_the_schedule_it_runs(name):
    """set_timesteps before init_noise_sigma, as diffusers' pipelines do: the first model input is the generator's
    noise scaled by the init_noise_sigma of the schedule being run (before: of the previous one, 1.7x too noisy
    here on a first call), and the same generator gives the same images on every call."""
    scheduler = _sigma_scheduler(name, **SD_CONFIG)
    pipe = ELSPipeline(unet=ELSUNet(_machine(F64)), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    inputs = []
    pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))

    def run():
        g = torch.Generator().manual_seed(0)
        return pipe(batch_size=2, generator=g, num_inference_steps=10, output_type="pt").images

    first, second = run(), run()
    assert torch.equal(first, second)
    reference = type(scheduler).from_config(scheduler.config)
    reference.set_timesteps(10)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = reference.scale_model_input(noise * reference.init_noise_sigma, reference.timesteps[0])
    torch.testing.assert_close(inputs[0], expected, rtol=1e-6, atol=0)


@needs_diffusers
@pytest.mark.parametrize(
    "name, config",
    [
        ("kdpm2", SD_CONFIG),
        ("dpmpp", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
        ("euler", {**SD_CONFIG, "use_karras_sigmas": True}),
    ],
)
def test_model_noise_level_is_the_schedulers_own(name, config):
    """The model's noise level is the one the scheduler steps with: sigma from its own `sigmas` table (KDPM2's
    log-sigma midpoints, Karras sigmas with rounded timesteps), to float rounding: sqrt(1 + sigma^2), the input
    scaling, agrees to float32 rounding. Before, sigma interpolated from alphas_cumprod at the timestep was off
    by up to 6.5% (KDPM2, 10 steps) and 3% (DPM++ Karras)."""
    scheduler = _sigma_scheduler(name, **config)
    m = _machine(F64)
    pipe = ELSPipeline(unet=ELSUNet(m), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    model, stepped = [], []
    denoise = m.denoise
    m.denoise = lambda x, abar, *a, **k: model.append(math.sqrt(1 / abar)) or denoise(x, abar, *a, **k)
    scale, step = scheduler.scale_model_input, scheduler.step

    def scaled(sample, t):
        out = scale(sample, t)
        if not torch.equal(out, sample):  # the scaling sample / out = sqrt(1 + sigma^2)
            stepped.append((sample / out).flatten()[0].item())
        return out

    def stepping(output, t, sample, **kw):  # DPM-Solver does not scale: the sigma of its step
        out = step(output, t, sample, **kw)
        if name == "dpmpp":
            stepped.append(math.sqrt(1 + scheduler.sigmas[scheduler.step_index - 1].item() ** 2))
        return out

    scheduler.scale_model_input, scheduler.step = scaled, stepping
    pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="pt")
    assert len(model) == len(stepped) >= 10
    worst = max(abs(a / b - 1) for a, b in zip(model, stepped, strict=True))
    assert worst < 1e-6, worst


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddim", "euler"])
@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_prediction_types_are_exact_conversions(kind, prediction_type):
    """A scheduler configured for x0 ("sample") or v prediction steps to the same images as one configured for
    epsilon: diffusers' step converts the model output back exactly. DDIM with float64 alphas_cumprod: to 1e-12;
    Euler keeps its sigmas in float32 and computes sigma^2 + 1 in float32, which ten steps amplify to a measured
    1.0e-5 (the bound leaves a factor 5)."""

    def images(prediction):
        if kind == "ddim":
            scheduler = DDIMScheduler(**{**ddim_scheduler_config(10), "prediction_type": prediction})
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # float64 steps: exact to 1e-12
        else:
            scheduler = EulerDiscreteScheduler(**SD_CONFIG, prediction_type=prediction)
        pipe = ELSPipeline(unet=ELSUNet(_machine(F64), patch_size=5), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(4)
        return pipe(batch_size=3, generator=g, num_inference_steps=9, output_type="pt").images

    eps = images("epsilon")
    other = images(prediction_type)
    assert eps.dtype == F64 and eps.std() > 0.05
    torch.testing.assert_close(other, eps, rtol=0, atol=1e-12 if kind == "ddim" else 5e-5)


@needs_diffusers
def test_unet_compile_in_a_pipeline_equals_eager(cpu_ext):
    """`unet.compile()` and `torch.compile(unet)` in a DDIMPipeline: no dynamo mutation error (the model finds
    its scheduler by a plain attribute), no crash of the raw-pointer CPU kernel (a graph break; it segfaulted),
    the eager images."""
    code = (
        "import torch, elsfast\n"
        "from diffusers import DDIMPipeline, DDIMScheduler\n"
        "from elsfast.integrations.diffusers import ELSUNet\n"
        "images = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1\n"
        "s = DDIMScheduler(beta_schedule='squaredcos_cap_v2', clip_sample=False, num_train_timesteps=100)\n"
        "pipe = DDIMPipeline(unet=ELSUNet(elsfast.ScoreMachine(images, backend='cpu')), scheduler=s)\n"
        "pipe.unet.follow(pipe)\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "def run():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return pipe(batch_size=2, generator=g, num_inference_steps=3, output_type='pt').images\n"
        "eager = run()\n"
        "pipe.unet.compile()\n"
        "assert torch.equal(run(), eager)\n"
        "pipe.unet = torch.compile(pipe.unet)\n"
        "assert torch.equal(run(), eager)\n"
        "print('compiled: same images')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "compiled: same images" in result.stdout


FRESH_LOAD = """
import sys, torch
from diffusers import DDIMPipeline, DiffusionPipeline
directory, kind = sys.argv[1], sys.argv[2]
if kind == "bare":
    try:
        DDIMPipeline.from_pretrained(directory + "/ddim")
    except ValueError as err:
        print("refused:", " ".join(str(err).split()))
    sys.exit(0)
import elsfast.integrations.diffusers  # diffusers loads components only from modules the process imported
ddim = DDIMPipeline.from_pretrained(directory + "/ddim")
ddim.unet.follow(ddim)
els = DiffusionPipeline.from_pretrained(directory + "/els")
out = {}
for name, pipe in (("ddim", ddim), ("els", els)):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    out[name] = pipe(batch_size=2, generator=g, num_inference_steps=4, output_type="pt").images
torch.save(out, directory + "/images.pt")
print(type(els).__name__, type(els.unet).__name__)
"""


@needs_diffusers
def test_saved_pipelines_load_in_a_fresh_process(tmp_path):
    """In a fresh interpreter: `DDIMPipeline.from_pretrained` and `DiffusionPipeline.from_pretrained` (an
    ELSPipeline directory, whose class diffusers looks up by name) give the same images, without diffusers'
    "Expected types for unet" warning. diffusers 0.42 imports no module a repository names: without the import
    it refuses, naming the module to import."""
    m = _machine(F64)  # built from tensors: the training set is saved with the pipeline
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, set_alpha_to_one=True)
    ddim = DDIMPipeline(unet=ELSUNet(m, patch_size=5), scheduler=scheduler)
    ddim.unet.follow(ddim)
    els = ELSPipeline(unet=ELSUNet(m, patch_size=5), scheduler=DDIMScheduler.from_config(scheduler.config))
    expected = {}
    for name, pipe in (("ddim", ddim), ("els", els)):
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(2)
        expected[name] = pipe(batch_size=2, generator=g, num_inference_steps=4, output_type="pt").images
        pipe.save_pretrained(tmp_path / name)
    script = tmp_path / "load.py"
    script.write_text(FRESH_LOAD)
    for kind in ("bare", "imported"):
        result = subprocess.run(
            [sys.executable, str(script), str(tmp_path), kind], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Expected types" not in result.stderr, result.stderr
        if kind == "bare":
            assert "refused: " in result.stdout and "import elsfast.integrations.diffusers" in result.stdout
    assert "ELSPipeline ELSUNet" in result.stdout
    images = torch.load(tmp_path / "images.pt")
    for name in ("ddim", "els"):
        torch.testing.assert_close(images[name], expected[name], rtol=0, atol=0)
