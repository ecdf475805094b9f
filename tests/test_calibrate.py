"""Calibration of P(t) against a network (SPEC section 3): a "network" that is an ELS machine with a known patch
size must be matched by that size at every step; the result's layout is the one `elsfast.sample` takes."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import elsfast
from elsfast.machine import ScoreMachine
from elsfast.research.calibrate import CalibrationResult, as_eps_fn, calibrate, seed_labels, seed_noise

STEPS = 10
SIZES = (1, 3, 5)


@pytest.fixture(scope="module")
def train():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(10, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.arange(10) % 2
    return images, labels


def machine_network(m: ScoreMachine, size: int, calls: list | None = None):
    def eps_fn(x, abar, labels):
        if calls is not None:
            calls.append((abar, None if labels is None else labels.tolist()))
        return m.eps(x, abar, size, labels)

    return eps_fn


@pytest.mark.parametrize("size", [3, 5])
def test_recovers_the_patch_size_of_an_els_network(train, size):
    images, _ = train
    m = ScoreMachine(images, machine="els", padding="zeros", dtype=torch.float64)
    calls = []
    res = calibrate(machine_network(m, size, calls), m, sizes=SIZES, seeds=range(4), steps=STEPS, progress=False)
    assert len(calls) == STEPS - 1  # the seeds run as one batch, one network call per step
    assert res.sizes == list(SIZES) and res.seeds == [0, 1, 2, 3] and res.labels == [None] * 4
    assert res.best.shape == (4, STEPS) and res.cosine.shape == (4, STEPS, len(SIZES))
    # on this problem the sizes never tie: the true one wins strictly at every step of every seed
    k = SIZES.index(size)
    cos = res.cosine[:, 1:]
    others = torch.cat([cos[..., :k], cos[..., k + 1 :]], dim=-1)
    torch.testing.assert_close(cos[..., k], torch.ones_like(cos[..., k]), rtol=0, atol=1e-12)
    assert (others.max(-1).values < 1 - 1e-6).all()
    assert (res.best[:, 1:] == size).all() and (res.best[:, 0] == 0).all()
    assert res.scales == [size] * STEPS
    assert torch.isnan(res.cosine[:, 0]).all()


def test_trajectory_is_the_networks_own(train):
    """The machines are evaluated on the network's x_t: every state the network sees comes from its own x0."""
    images, _ = train
    m = ScoreMachine(images, machine="els", padding="zeros", dtype=torch.float64)
    seen = []

    def eps_fn(x, abar, labels):
        seen.append(x.clone())
        return m.eps(x, abar, 3, labels)

    calibrate(eps_fn, m, sizes=(1, 3), seeds=[5, 7], steps=4, progress=False)
    torch.testing.assert_close(seen[0], seed_noise([5, 7], (1, 8, 8)))
    want = elsfast.sample(m, 2, steps=4, patch_size=3, noise=seed_noise([5, 7], (1, 8, 8)), progress=False)
    x = seen[-1]
    abar = elsfast.common.schedules.abar_cosine_legacy(1 / 4)
    # the network's trajectory is computed in float32 (the noise's dtype), the sampler's in float64
    torch.testing.assert_close(m.denoise(x, abar, 3).float(), want.float(), rtol=1e-5, atol=1e-5)


def test_seed_noise_matches_sample():
    a = seed_noise([3], (1, 4, 4))
    assert torch.equal(a, torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(seed_noise([1, 3], (1, 4, 4))[1], a[0])


def test_conditional_labels_and_machine_dict(train):
    images, labels = train
    m = ScoreMachine(images, labels, machine="els", padding="zeros", dtype=torch.float64)
    calls = []
    res = calibrate(machine_network(m, 3, calls), {1: m, 3: m}, seeds=[0, 1, 2], steps=4, progress=False)
    assert res.sizes == [1, 3] and res.labels == [0, 1, 0]
    assert all(y == [0, 1, 0] for _, y in calls)
    assert res.scales == [3] * 4
    factory_calls = []
    res = calibrate(
        machine_network(m, 3),
        lambda p: factory_calls.append(p) or m,
        sizes=(3, 1),
        seeds=[0, 1],
        steps=4,
        labels_for_seed={0: 1, 1: 1},
        progress=False,
    )
    assert sorted(factory_calls) == [1, 3] and res.labels == [1, 1] and res.sizes == [1, 3]
    with pytest.raises(ValueError, match="no training images"):
        seed_labels([0], 7, [0, 1])
    with pytest.raises(ValueError, match="image_shape"):
        calibrate(machine_network(m, 3), m, (1, 9, 9), sizes=(3,), seeds=[0], steps=3, progress=False)


def test_scales_layout_json_and_plot(train, tmp_path):
    best = torch.tensor([[0, 3, 3, 5, 7], [0, 3, 5, 5, 9], [0, 1, 5, 7, 9], [0, 3, 3, 7, 7]])
    res = CalibrationResult(
        steps=5,
        sizes=[1, 3, 5, 7, 9],
        seeds=[0, 1, 2, 3],
        labels=[None] * 4,
        best=best,
        cosine=torch.rand(4, 5, 5, dtype=torch.float64),
    )
    # lower median per step (always a candidate), entry 0 repeats entry 1
    assert res.scales == [3, 3, 3, 5, 7]
    path = res.to_json(tmp_path / "cal" / "scales.json")
    data = json.loads(path.read_text())
    assert data["scales"] == [3, 3, 3, 5, 7] and data["t"] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert data["best"]["1"] == [None, 3, 5, 5, 9]
    back = CalibrationResult.from_json(path)
    assert torch.equal(back.best, best) and back.scales == res.scales
    torch.testing.assert_close(back.cosine[:, 1:], res.cosine[:, 1:])
    # the list is a patch-size spec of the sampler as it is
    size = elsfast.common.scales.resolve_patch_size(res.scales, 5)
    assert [size(i / 5, i) for i in range(1, 5)] == [3, 3, 5, 7]
    pytest.importorskip("matplotlib")
    png = res.plot(tmp_path / "p.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 500  # two panels, README size
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 3
    assert res.plot(tmp_path / "p.svg").read_bytes().lstrip().startswith(b"<?xml")


def test_module_network_is_wrapped_with_its_time(train):
    seen = []

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, labels=None):
            seen.append(t.clone())
            return x * 0 + self.w

    eps_fn = as_eps_fn(StandIn())
    abar = 0.3
    out = eps_fn(torch.ones(2, 1, 4, 4), abar, None)
    assert out.shape == (2, 1, 4, 4)
    assert seen[0].tolist() == pytest.approx([1.008 * 2 / math.pi * math.acos(math.sqrt(abar))] * 2, rel=1e-6)
    # a ScoreMachine is a torch.nn.Module too, but not a network: refused, not called as model(x, t, labels)
    machine = ScoreMachine(torch.zeros(2, 1, 4, 4))
    with pytest.raises(TypeError, match=r"is an elsfast\.ScoreMachine"):
        as_eps_fn(machine)
