"""The DDIM sampler, schedules and patch-size specs (SPEC section 1) and the paper's Fig. 3 toy (SPEC section 2)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import elsfast
from elsfast.common.scales import READINGS, patch_size_at, reference_scales, resolve_patch_size
from elsfast.common.schedules import abar_cosine, abar_cosine_legacy, get_schedule


def test_schedules():
    assert abar_cosine_legacy(0.0) == 1.0
    assert abar_cosine_legacy(1.0) == pytest.approx(math.cos(math.pi / 2 / 1.008) ** 2)
    assert abar_cosine(0.0) == pytest.approx(1.0)
    assert abar_cosine(1.0) == pytest.approx(0.0, abs=1e-12)
    ts = [i / 50 for i in range(51)]
    for f in (abar_cosine, abar_cosine_legacy):
        values = [f(t) for t in ts]
        assert all(a > b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError, match="unknown schedule"):
        get_schedule("linear-ish")


def test_sampler_makes_n_minus_one_evaluations_on_the_grid():
    calls = []

    def denoiser(x, abar, i):
        calls.append((i, abar))
        return torch.zeros_like(x)

    x = torch.randn(2, 1, 3, 3)
    out = elsfast.ddim_sample(denoiser, x, steps=20, progress=False)
    assert [i for i, _ in calls] == list(range(19, 0, -1))
    assert [a for _, a in calls] == [abar_cosine_legacy(i / 20) for i in range(19, 0, -1)]
    # the last update lands on abar = 1: the output is the last x0 prediction
    torch.testing.assert_close(out, torch.zeros_like(x))


def test_sampler_update_is_ddim():
    # with D(x) = c x the DDIM recursion has a closed form per step; check one step by hand
    seen = []
    x = torch.randn(1, 1, 2, 2)

    def denoiser(x_t, abar, i):
        return 0.5 * x_t

    elsfast.ddim_sample(denoiser, x, steps=3, progress=False, callback=seen.append)
    a2, a1 = abar_cosine_legacy(2 / 3), abar_cosine_legacy(1 / 3)
    x0 = 0.5 * x
    eps = (x - math.sqrt(a2) * x0) / math.sqrt(1 - a2)
    torch.testing.assert_close(seen[0]["x"], math.sqrt(a1) * x0 + math.sqrt(1 - a1) * eps)
    assert [s["i"] for s in seen] == [2, 1]


def test_patch_size_specs():
    assert resolve_patch_size(5, 20)(0.5, 10) == 5
    table = list(range(1, 40, 2))
    size = resolve_patch_size(table, 20)
    assert [size(i / 20, i) for i in range(20)] == table
    assert resolve_patch_size(lambda t: 3 if t < 0.5 else 7, 20)(0.9, 18) == 7
    name = "MNIST_ResNet_zeros"
    published = reference_scales()[name]
    size = resolve_patch_size(name, 20)
    assert [size(i / 20, i) for i in range(20)] == published
    size10 = resolve_patch_size(name, 10)
    assert size10(0.5, 5) == published[10]
    with pytest.raises(ValueError, match="one entry per step"):
        resolve_patch_size([3, 5], 20)
    with pytest.raises(ValueError, match="unknown calibrated scales"):
        resolve_patch_size("NOPE", 20)


def test_shifted_reading_is_exactly_one_step_earlier():
    """NAME:shifted reads entry i - 1 at t = i / n (where the authors' calibration stored the P for t = i / n);
    the ends clip: t = 1 reads the last entry in both readings, t = 0 entry 0 in both (SPEC section 4)."""
    assert READINGS == ("published", "shifted")
    for name, published in reference_scales().items():
        n = len(published)
        assert [patch_size_at(name, i / n) for i in range(n + 1)] == [*published, published[-1]]
        assert [patch_size_at(f"{name}:published", i / n) for i in range(n + 1)] == [*published, published[-1]]
        assert [patch_size_at(f"{name}:shifted", i / n) for i in range(n + 1)] == [published[0], *published]
        for i in range(1, n + 1):  # exactly one step of the grid: shifted at t is published at t - 1/n
            assert patch_size_at(f"{name}:shifted", i / n) == patch_size_at(name, (i - 1) / n)
        size = resolve_patch_size(f"{name}:shifted", 20)
        assert [size(i / 20, i) for i in range(1, 20)] == published[:19]  # elsfast's grid never reads the last
    table = [3, 5, 7, 9]
    assert [patch_size_at(table, i / 4, reading="shifted") for i in range(5)] == [3, 3, 5, 7, 9]
    assert [patch_size_at(table, i / 4) for i in range(5)] == [3, 5, 7, 9, 9]
    assert patch_size_at(5, 0.3, reading="shifted") == 5  # an int or a callable has no entries to shift
    assert patch_size_at("MNIST_UNet_zeros", 0.5, reading="shifted") == reference_scales()["MNIST_UNet_zeros"][10]
    with pytest.raises(ValueError, match="unknown reading 'sideways'"):
        resolve_patch_size("MNIST_UNet_zeros:sideways", 20)
    with pytest.raises(ValueError, match="reading: expected one of published, shifted"):
        patch_size_at(table, 0.5, reading="late")
    with pytest.raises(ValueError, match="unknown calibrated scales 'NOPE'"):
        patch_size_at("NOPE:shifted", 0.5)


@pytest.mark.parametrize("reading", ["published", "shifted"])
def test_sampler_reads_the_named_reading(reading):
    name = "MNIST_ResNet_zeros"
    published = reference_scales()[name]
    train = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    m = elsfast.ScoreMachine(train, machine="ls", padding="zeros", dtype=torch.float64)
    _, trace = elsfast.sample(m, n=1, steps=20, patch_size=f"{name}:{reading}", seed=0, return_provenance=True)
    shift = READINGS.index(reading)  # entry i (published) or i - 1 (shifted) at t = i/20, i = 19..1
    assert trace.patch_sizes == [published[i - shift] for i in range(19, 0, -1)]


def test_reference_scales_ship_with_the_package():
    scales = reference_scales()
    assert len(scales) >= 10
    for name, values in scales.items():
        assert len(values) == 20, name
        assert all(v % 2 == 1 for v in values), name


def test_fig3_toy_makes_patch_mosaics():
    """Training set: one all-black and one all-white 16x16 image; ELS, 3x3, circular, 100 steps (paper Fig. 3)."""
    train = torch.stack([-torch.ones(1, 16, 16), torch.ones(1, 16, 16)])
    m = elsfast.ScoreMachine(train, machine="els", padding="circular")
    noise = torch.cat([torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(8)])
    xs = elsfast.sample(m, n=8, steps=100, patch_size=3, noise=noise, progress=False)
    assert ((xs.abs() - 1).abs() <= 0.05).all(), "pixels must converge to +-1"
    s = xs.sign()
    majority = F.pad(s, (1, 1, 1, 1), mode="circular").unfold(2, 3, 1).unfold(3, 3, 1).sum((-1, -2)).sign()
    broken = (majority != s).float().mean().item()
    assert broken <= 0.02, f"{broken:.3%} of pixels break the 3x3 majority rule"
    assert len({tuple(v.flatten().tolist()) for v in s}) == 8, "all 8 seeds must give distinct images"
    assert all(0 < (v > 0).float().mean() < 1 for v in s), "mosaics, not copies of a training image"


def test_ideal_score_machine_memorises():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    out = elsfast.sample(train, n=8, machine="is", steps=20, seed=1, progress=False)
    dist = torch.cdist(out.flatten(1).double(), train.flatten(1).double()).min(dim=1).values
    assert (dist < 1e-4).all(), dist


def test_sampling_is_deterministic_and_seeded():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
    a = elsfast.sample(train, n=3, steps=6, patch_size=[3, 3, 3, 5, 5, 5], seed=7, progress=False)
    b = elsfast.sample(train, n=3, steps=6, patch_size=[3, 3, 3, 5, 5, 5], seed=7, progress=False)
    c = elsfast.sample(train, n=3, steps=6, patch_size=[3, 3, 3, 5, 5, 5], seed=8, progress=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (3, 1, 8, 8)


def test_conditional_sampling_uses_the_class_dictionary():
    # class 0 is all black, class 1 all white: a conditional IS sample must be its class's colour
    train = torch.cat([-torch.ones(2, 1, 6, 6), torch.ones(2, 1, 6, 6)])
    labels = torch.tensor([0, 0, 1, 1])
    out = elsfast.sample(train, n=4, machine="els", labels=[1, 0, 1, 0], train_labels=labels, steps=10, progress=False)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([1.0, -1.0, 1.0, -1.0]))
    same = elsfast.sample(train, n=2, machine="els", labels=1, train_labels=labels, steps=10, progress=False)
    assert (same == 1).all()


def test_sample_bad_arguments():
    train = torch.rand(4, 1, 6, 6) * 2 - 1
    with pytest.raises(ValueError, match="steps"):
        elsfast.sample(train, n=1, steps=1, progress=False)
    with pytest.raises(ValueError, match="n must be"):
        elsfast.sample(train, n=0, progress=False)
    with pytest.raises(ValueError, match="one per sample"):
        elsfast.sample(train, n=3, labels=[0, 1], train_labels=[0, 0, 1, 1], progress=False)
    with pytest.raises(ValueError, match="noise must have shape"):
        elsfast.sample(train, n=2, noise=torch.zeros(2, 1, 5, 5), progress=False)


def test_sample_from_a_dataset_name():
    out = elsfast.sample("mnist-embedded", n=2, steps=3, patch_size=3, progress=False)
    assert out.shape == (2, 1, 28, 28)
    assert torch.isfinite(out).all()


class _Crash(Exception):
    pass


def test_checkpoint_resumes_after_a_crash(tmp_path):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
    m = elsfast.ScoreMachine(train)
    ckpt = tmp_path / "run.ckpt"
    full = elsfast.sample(m, n=2, steps=8, seed=4, progress=False)

    def crash(info):
        if info["i"] == 4:
            raise _Crash

    with pytest.raises(_Crash):
        elsfast.sample(m, n=2, steps=8, seed=4, progress=False, resume_from=ckpt, callback=crash)
    assert ckpt.exists()
    steps_run = []
    resumed = elsfast.sample(
        m, n=2, steps=8, seed=4, progress=False, resume_from=ckpt, callback=lambda info: steps_run.append(info["i"])
    )
    assert steps_run == [3, 2, 1], "resumes at the step after the last one saved"
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    assert not ckpt.exists(), "a finished run removes its checkpoint"


def test_checkpoint_of_another_run_or_a_foreign_file_is_refused_and_kept(tmp_path):
    train = torch.rand(6, 1, 6, 6) * 2 - 1
    ckpt = tmp_path / "run.ckpt"

    def crash(info):
        raise _Crash

    with pytest.raises(_Crash):
        elsfast.sample(train, n=1, steps=5, seed=1, progress=False, resume_from=ckpt, callback=crash)
    saved = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"run\.ckpt holds the state of another sampling run"):
        elsfast.sample(train, n=1, steps=5, seed=2, progress=False, resume_from=ckpt)
    assert ckpt.read_bytes() == saved, "another run's checkpoint is left as it is"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"run\.ckpt is not an elsfast sampling checkpoint: it looks like a file"):
        elsfast.sample(train, n=1, steps=5, seed=2, progress=False, resume_from=ckpt)
    assert ckpt.read_bytes() == b"not a checkpoint"


def test_checkpoint_is_the_deprecated_name_of_resume_from(tmp_path):
    train = torch.rand(6, 1, 6, 6) * 2 - 1
    with pytest.warns(DeprecationWarning, match="resume_from"):
        old = elsfast.sample(train, n=1, steps=4, seed=0, progress=False, checkpoint=tmp_path / "a.ckpt")
    torch.testing.assert_close(old, elsfast.sample(train, n=1, steps=4, seed=0, progress=False), rtol=0, atol=0)
    with pytest.raises(TypeError, match="resume_from"):
        elsfast.sample(train, n=1, steps=4, checkpoint="a", resume_from="b")


def test_generator_as_torch_takes_it_and_seed_as_a_convenience():
    """Issue 26, item 4: `generator=` as torch functions take it; None (the default) draws from torch's global
    generator, so torch.manual_seed decides the images (before, seed=0 by default ignored it: every call gave the
    same images); `seed=` an int (or a generator) is a convenience; not both."""
    train = torch.rand(6, 1, 6, 6) * 2 - 1
    a = elsfast.sample(train, n=2, steps=4, generator=torch.Generator().manual_seed(9), progress=False)
    b = elsfast.sample(train, n=2, steps=4, seed=9, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = elsfast.sample(train, n=2, steps=4, seed=torch.Generator().manual_seed(9), progress=False)
    torch.testing.assert_close(c, b, rtol=0, atol=0)
    torch.manual_seed(9)
    d = elsfast.sample(train, n=2, steps=4, progress=False)
    torch.testing.assert_close(d, b, rtol=0, atol=0)  # torch.manual_seed(9): the global generator's draw
    e = elsfast.sample(train, n=2, steps=4, progress=False)
    assert (e - d).abs().max() > 0.01  # the global generator moved on
    with pytest.raises(TypeError, match="give generator= or seed=, not both"):
        elsfast.sample(train, n=1, steps=3, generator=torch.Generator(), seed=1, progress=False)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        elsfast.sample(train, n=1, steps=3, generator=3, progress=False)


def test_data_root_is_the_deprecated_name_of_root(tmp_path):
    with pytest.warns(DeprecationWarning, match="use root="):
        old = elsfast.sample("mnist-embedded", n=1, steps=3, limit=50, data_root=tmp_path, seed=0, progress=False)
    new = elsfast.sample("mnist-embedded", n=1, steps=3, limit=50, root=tmp_path, seed=0, progress=False)
    torch.testing.assert_close(old, new, rtol=0, atol=0)


def test_machine_options_belong_to_the_machine():
    train = torch.rand(6, 1, 6, 6) * 2 - 1
    m = elsfast.ScoreMachine(train, machine="ls")
    with pytest.raises(TypeError, match="pass them to ScoreMachine"):
        elsfast.sample(m, n=1, steps=3, padding="circular", progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword.*bogus"):
        elsfast.sample(train, n=1, steps=3, bogus=1, progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword.*limit"):
        elsfast.sample(train, n=1, steps=3, limit=3, progress=False)  # a dataset option with a tensor source
    # options given to sample build the same machine as ScoreMachine itself
    a = elsfast.sample(train, n=2, steps=4, machine="ls", padding="circular", seed=0, progress=False)
    b = elsfast.sample(
        elsfast.ScoreMachine(train, machine="ls", padding="circular"), n=2, steps=4, seed=0, progress=False
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddim_start_at_t_one_is_the_network_grid():
    from elsfast.sampling.ddim import grid_start

    assert grid_start("machine", 20) == 19 and grid_start("network", 20) == 20
    with pytest.raises(ValueError, match="abar = 0"):
        grid_start("network", 20, "cosine")  # abar(1) of the improved cosine schedule is 0 to float precision
    seen = []
    x = torch.zeros(1, 1, 2, 2)
    elsfast.ddim_sample(lambda x, abar, i: x, x, steps=5, start=5, progress=False, callback=lambda d: seen.append(d))
    assert [d["i"] for d in seen] == [5, 4, 3, 2, 1] and seen[0]["t"] == 1.0
    with pytest.raises(ValueError, match="start must lie in"):
        elsfast.ddim_sample(lambda x, abar, i: x, x, steps=5, start=6, progress=False)


# ---------------------------------------------------------------------------------------------- issue 28, item 2


def test_grid_times_keep_each_grid_bit_for_bit_and_share_the_first_t():
    """`grid_times` of a sampler sharing its own start is the grid i / n bit for bit (so every caller of the step
    grids is unchanged); a 150-step network sharing the start of a 20-step machine begins at 19/20 on the machine
    grid (149 equal updates) and at 1 on the network grid (150 updates)."""
    from fractions import Fraction

    from elsfast.sampling.ddim import grid_times

    for n in range(2, 301):
        assert grid_times("machine", n) == [i / n for i in range(n)]
        assert grid_times("network", n) == [i / n for i in range(n + 1)]
        assert grid_times("machine", n, shared_start=n) == [i / n for i in range(n)]
    times = grid_times("machine", 150, shared_start=20)
    assert len(times) == 150 and times[-1] == 19 / 20 and times[0] == 0.0
    assert times == [float(Fraction(19, 20) * Fraction(i, 149)) for i in range(150)]  # the nearest floats
    assert grid_times("network", 150, shared_start=20) == [i / 150 for i in range(151)]
    assert grid_times("machine", 20, shared_start=150)[-1] == 149 / 150
    with pytest.raises(ValueError, match="unknown step grid"):
        grid_times("both", 20)
    with pytest.raises(ValueError, match="shared_start must be at least 2"):
        grid_times("machine", 20, shared_start=1)


def _float64_ddim(denoise, x, t_first, updates: int, abar_of):
    """An independent float64 DDIM loop (eta = 0): `updates` equal steps from t_first (a Fraction) down to 0, each
    t the float nearest the exact fraction."""
    from fractions import Fraction

    seen = []
    for j in range(updates, 0, -1):
        t, t_prev = (float(Fraction(t_first) * Fraction(k, updates)) for k in (j, j - 1))
        a, a_prev = abar_of(t), abar_of(t_prev)
        seen.append(a)
        x0 = denoise(x, a)
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x, seen


def test_ddim_on_grid_times_is_the_float64_reference_loop():
    """The 150-step network of the paper's Table 1, run from the machines' first t on the machine grid: the abar
    sequence it is evaluated at begins at abar(19/20), the machines' first, and the trajectory matches a float64
    reference loop of 149 equal steps from t = 19/20."""
    from elsfast.sampling.ddim import grid_times

    g = torch.Generator().manual_seed(28)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4

    def denoise(y, abar):  # a nonlinear stand-in for a network's x0 prediction
        return torch.tanh((y.reshape(2, 16) @ w).reshape(y.shape) * math.sqrt(abar) + abar)

    abar_of = get_schedule("cosine-legacy")
    from fractions import Fraction

    expected, expected_abars = _float64_ddim(denoise, x, Fraction(19, 20), 149, abar_of)
    machine_abars = []
    elsfast.ddim_sample(lambda y, a, i: machine_abars.append(a) or y, x, steps=20, progress=False)
    abars = []
    out = elsfast.ddim_sample(
        lambda y, a, i: abars.append(a) or denoise(y, a), x, times=grid_times("machine", 150, shared_start=20),
        progress=False,
    )  # fmt: skip
    assert len(abars) == 149 and abars[0] == machine_abars[0] == abar_of(19 / 20)
    assert abars == expected_abars
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # the network grid: both from t = 1, the network 150 updates of 1/150
    expected, expected_abars = _float64_ddim(denoise, x, Fraction(1), 150, abar_of)
    abars.clear()
    out = elsfast.ddim_sample(
        lambda y, a, i: abars.append(a) or denoise(y, a), x, times=grid_times("network", 150, shared_start=20),
        progress=False,
    )  # fmt: skip
    assert len(abars) == 150 and abars == expected_abars and abars[0] == abar_of(1.0)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_ddim_times_of_the_step_grid_are_bit_identical_and_checked():
    from elsfast.sampling.ddim import grid_times

    x = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(5))

    def denoiser(y, abar, i):
        return torch.sin(y * (1 + abar)) + 0.01 * i

    for grid, start in (("machine", None), ("network", 20)):
        a = elsfast.ddim_sample(denoiser, x, steps=20, start=start, progress=False)
        b = elsfast.ddim_sample(denoiser, x, times=grid_times(grid, 20), progress=False)
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="either times or steps"):
        elsfast.ddim_sample(denoiser, x, steps=20, times=grid_times("machine", 20), progress=False)
    with pytest.raises(ValueError, match="either times or steps"):
        elsfast.ddim_sample(denoiser, x, start=3, times=[0.0, 0.5], progress=False)
    for bad in ([0.5, 0.9], [0.0, 0.5, 0.5], [0.0], [0.0, 1.5], [0.0, 0.6, 0.3]):
        with pytest.raises(ValueError, match="times must increase strictly from 0"):
            elsfast.ddim_sample(denoiser, x, times=bad, progress=False)
