import math

import pytest
import torch

from elsfast.common.schedules import abar_cosine, abar_cosine_legacy, t_of_abar
from elsfast.nets.models import (
    NetworkDenoiser,
    ResNet,
    UNet,
    build_model,
    eps_at,
    model_config,
)
from elsfast.sampling import ddim_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _seeded(cls, *args, **kw):
    torch.manual_seed(0)
    return cls(*args, **kw)


def test_resnet_receptive_field_is_17x17():
    model = _seeded(ResNet, in_channels=1, channels=16, blocks=6).double()
    assert model.receptive_field == 17
    size, centre = 40, 20
    x = torch.randn(1, 1, size, size, dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    x2 = x.clone()
    x2[0, 0, centre, centre] += 1.0
    with torch.no_grad():
        changed = (model(x2, t) - model(x, t)).abs()[0, 0] > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    # Nothing changes outside the 17 x 17 box around the perturbed pixel, and the box's edges are reached.
    assert rows.min() == centre - 8 and rows.max() == centre + 8
    assert cols.min() == centre - 8 and cols.max() == centre + 8


def test_circular_resnet_commutes_with_circular_shifts():
    model = _seeded(ResNet, in_channels=2, channels=16, blocks=3, padding="circular")
    x, t = torch.randn(2, 2, 12, 10), torch.rand(2)
    with torch.no_grad():
        shifted_out = model(torch.roll(x, (3, -4), dims=(2, 3)), t)
        out_shifted = torch.roll(model(x, t), (3, -4), dims=(2, 3))
    torch.testing.assert_close(shifted_out, out_shifted, atol=1e-5, rtol=1e-5)


def test_zero_padded_resnet_is_not_shift_equivariant():
    model = _seeded(ResNet, in_channels=1, channels=16, blocks=2)
    x, t = torch.randn(1, 1, 10, 10), torch.rand(1)
    with torch.no_grad():
        a = model(torch.roll(x, (3, 3), dims=(2, 3)), t)
        b = torch.roll(model(x, t), (3, 3), dims=(2, 3))
    assert (a - b).abs().max() > 1e-3


def test_circular_unet_commutes_with_shifts_by_multiples_of_4():
    model = _seeded(UNet, channels=(8, 8, 16), padding="circular")
    x, t = torch.randn(1, 1, 16, 16), torch.rand(1)
    with torch.no_grad():
        a = model(torch.roll(x, (4, -8), dims=(2, 3)), t)
        b = torch.roll(model(x, t), (4, -8), dims=(2, 3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [28, 32])
def test_unet_handles_mnist_and_padded_sizes(size):
    model = _seeded(UNet, in_channels=1, channels=(8, 16, 32), num_classes=10)
    out = model(torch.randn(2, 1, size, size), torch.rand(2), torch.tensor([3, 7]))
    assert out.shape == (2, 1, size, size)


def test_unet_rejects_sizes_not_divisible_by_4():
    model = _seeded(UNet, channels=(8, 16, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 1, 30, 30), torch.rand(1))


@pytest.mark.parametrize("cls", [ResNet, UNet])
def test_conditioning_requires_labels(cls):
    kw = {"channels": 8, "blocks": 1} if cls is ResNet else {"channels": (8, 8)}
    cond = _seeded(cls, num_classes=10, **kw)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(ValueError, match="labels"):
        cond(x, t)
    a = cond(x, t, torch.tensor([0, 1]))
    b = cond(x, t, torch.tensor([0, 2]))
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 0  # the label changes the output
    uncond = _seeded(cls, **kw)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))


def test_time_changes_the_output():
    model = _seeded(ResNet, channels=8, blocks=1)
    x = torch.randn(1, 1, 8, 8)
    assert (model(x, torch.tensor([0.1])) - model(x, torch.tensor([0.9]))).abs().max() > 0


def test_build_model_round_trips_through_a_plain_config():
    for model in (
        _seeded(ResNet, in_channels=3, channels=8, blocks=2, padding="circular", num_classes=5),
        _seeded(UNet, in_channels=1, channels=(8, 16), blocks=2),
    ):
        config = model_config(model)
        assert all(isinstance(v, str | int | list | type(None)) for v in config.values())
        rebuilt = build_model(config)
        rebuilt.load_state_dict(model.state_dict())
        c = model.in_channels
        x, t = torch.randn(2, c, 8, 8), torch.rand(2)
        labels = torch.tensor([1, 4]) if model.num_classes else None
        torch.testing.assert_close(rebuilt(x, t, labels), model(x, t, labels))
        assert model_config(rebuilt) == config


def test_build_model_defaults_and_errors():
    assert model_config(build_model({"arch": "resnet"}))["channels"] == 256
    assert model_config(build_model({"arch": "unet", "channels": [4, 8, 16]}))["channels"] == [4, 8, 16]
    with pytest.raises(ValueError, match="arch"):
        build_model({"arch": "vit"})
    with pytest.raises(ValueError, match="unknown model config keys"):
        build_model({"arch": "resnet", "attention": True})
    with pytest.raises(ValueError, match="padding"):
        build_model({"arch": "resnet", "channels": 4, "padding": "reflect"})


@pytest.mark.parametrize("schedule", ["cosine-legacy", "cosine", lambda t: math.cos(math.pi / 2 * t) ** 2])
def test_abar_to_t_inverts_the_schedule(schedule):
    abar_of = {"cosine-legacy": abar_cosine_legacy, "cosine": abar_cosine}.get(schedule, schedule)
    for t in (0.0, 0.05, 0.37, 0.5, 0.95):
        assert t_of_abar(abar_of(t), schedule) == pytest.approx(t, abs=1e-9)
    assert t_of_abar(1.0, schedule) == pytest.approx(0.0, abs=1e-9)


def test_network_denoiser_drives_ddim_sample():
    model = _seeded(ResNet, channels=8, blocks=2, num_classes=3)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = ddim_sample(NetworkDenoiser(model, labels=[0, 1, 2]), noise, steps=5, progress=False)
    assert out.shape == noise.shape and out.dtype == noise.dtype
    assert torch.isfinite(out).all()
    single = ddim_sample(NetworkDenoiser(model, labels=2), noise, steps=5, progress=False)
    assert torch.isfinite(single).all()


def test_denoiser_is_the_x0_of_eps_at():
    model = _seeded(ResNet, channels=8, blocks=1)
    x, abar = torch.randn(5, 1, 8, 8, dtype=torch.float64), 0.3
    eps = eps_at(model, x, abar)
    assert eps.dtype == torch.float64
    t = torch.full((5,), t_of_abar(abar))
    with torch.no_grad():
        torch.testing.assert_close(eps.float(), model(x.float(), t))
    x0 = NetworkDenoiser(model)(x, abar, 1)
    torch.testing.assert_close(x0, (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar))
    torch.testing.assert_close(eps_at(model, x, abar, batch_size=2), eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("abar", [1e-3, 0.3, 0.97])
def test_denoiser_of_an_eps_fn_inverts_the_forward_process(abar):
    """An eps_fn that returns the noise actually added: the denoiser gives back the clean image (x = sqrt(abar) x0
    + sqrt(1 - abar) eps), and it passes the labels it was given."""
    g = torch.Generator().manual_seed(23)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
    labels = torch.tensor([2, 0, 1])
    seen = []

    def eps_fn(x_t, a, y):
        seen.append((a, y))
        return noise.float()  # returned in another dtype: the denoiser works in x's

    out = NetworkDenoiser(eps_fn, labels=labels)(x, abar, 0)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6 / math.sqrt(abar))
    assert seen == [(abar, labels)]


def test_network_denoiser_of_calibrate_is_deprecated():
    from elsfast.research.calibrate import network_denoiser

    with pytest.warns(DeprecationWarning, match="NetworkDenoiser"):
        denoiser = network_denoiser(lambda x, abar, labels: torch.zeros_like(x))
    assert isinstance(denoiser, NetworkDenoiser)
    torch.testing.assert_close(denoiser(torch.ones(1, 1, 2, 2), 0.25, 0), torch.full((1, 1, 2, 2), 2.0))


# ------------------------------------------------------------------------------------------------------------
# the UNet with self-attention (arch "unet-sa")


def test_self_attention_block_is_softmax_attention_in_float64():
    """The attention block against a float64 brute force: x + W_o softmax(q k^T / sqrt(d)) v per head, with q, k,
    v the 1x1 projections of GroupNorm(x)."""
    from elsfast.nets.models import UNet

    torch.manual_seed(3)
    net = UNet(in_channels=1, channels=(8, 16), attention=[1], heads=2).double()
    block = net.down_attention[1][0]
    for p in block.parameters():  # random affine norm and biases, so that every term is exercised
        p.data.normal_()
    x = torch.randn(2, 16, 3, 5, dtype=torch.float64)
    h = torch.nn.functional.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    qkv = torch.einsum("oc,bcn->bon", block.qkv.weight[:, :, 0, 0], h.flatten(2)) + block.qkv.bias[None, :, None]
    q, k, v = qkv.reshape(2, 3, 2, 8, 15).unbind(1)  # [b, head, d, n]
    weights = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) / math.sqrt(8), dim=-1)
    attended = torch.einsum("bhnm,bhdm->bhdn", weights, v).reshape(2, 16, 15)
    out = torch.einsum("oc,bcn->bon", block.out.weight[:, :, 0, 0], attended) + block.out.bias[None, :, None]
    torch.testing.assert_close(block(x), x + out.reshape(2, 16, 3, 5), rtol=1e-12, atol=1e-12)


def test_attention_makes_the_unet_non_local():
    """A pixel far outside the convolution-only UNet's receptive field changes nothing at the opposite corner of
    the convolution-only network's output, and changes the attention UNet's."""
    x = torch.randn(1, 1, 64, 64)
    far = x.clone()
    far[..., 63, 63] += 1.0
    t = torch.tensor([0.5])
    local = _seeded(UNet, channels=(4, 8), blocks=1)
    assert (local(far, t) - local(x, t))[..., 0, 0].abs().max() == 0
    attentive = _seeded(UNet, channels=(4, 8), blocks=1, attention=[1])
    assert (attentive(far, t) - attentive(x, t))[..., 0, 0].abs().max() > 1e-6


def test_circular_attention_unet_commutes_with_shifts_by_multiples_of_its_factor():
    model = _seeded(UNet, channels=(4, 8, 8), padding="circular", attention=[1, 2], heads=2, num_classes=3)
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 2])
    shifted = model(torch.roll(x, (4, 8), (-2, -1)), t, y)
    torch.testing.assert_close(shifted, torch.roll(model(x, t, y), (4, 8), (-2, -1)), rtol=1e-4, atol=1e-5)


def test_attention_unet_config_round_trips_and_bad_settings_are_refused():
    model = _seeded(UNet, in_channels=3, channels=(8, 16, 16), attention=[2, 1], heads=2, num_classes=4)
    config = model_config(model)
    assert config["arch"] == "unet-sa" and config["attention"] == [1, 2] and config["heads"] == 2
    rebuilt = build_model(config)
    rebuilt.load_state_dict(model.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 3])
    torch.testing.assert_close(rebuilt(x, t, y), model(x, t, y))
    default = model_config(build_model({"arch": "unet-sa"}))
    assert default["channels"] == [64, 128, 256] and default["attention"] == [1, 2] and default["heads"] == 1
    assert "attention" not in model_config(build_model({"arch": "unet", "channels": [4, 8]}))
    with pytest.raises(ValueError, match="unknown model config keys"):
        build_model({"arch": "unet", "attention": [1]})
    with pytest.raises(ValueError, match=r"attention levels must lie in 0\.\.1"):
        UNet(channels=(4, 8), attention=[2])
    with pytest.raises(ValueError, match="heads"):
        UNet(channels=(4, 6), attention=[1], heads=4)
