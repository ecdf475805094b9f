"""Torch conventions of machines and adapters (issue 26, item 4): outputs in the input's dtype and on its device,
clear errors for devices that are not available here. (`generator=` of `sample`: tests/test_sampling.py.)"""

import pytest
import torch

import elsfast
from elsfast.integrations.k_diffusion import ELSDenoiser

F64 = torch.float64


def _machine(dtype):
    images = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    return elsfast.ScoreMachine(images, dtype=dtype, backend="torch")


@pytest.mark.parametrize("machine_dtype, input_dtype", [(F64, torch.float32), (torch.float32, F64)])
def test_outputs_take_the_inputs_dtype(machine_dtype, input_dtype):
    """denoise, eps and score compute in the machine's dtype and return the input's (before: the machine's)."""
    m = _machine(machine_dtype)
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=input_dtype)
    exact = m.denoise(x.to(machine_dtype), 0.6, 3)
    assert exact.dtype == machine_dtype
    d = m.denoise(x, 0.6, 3)
    assert d.dtype == input_dtype
    torch.testing.assert_close(d, exact.to(input_dtype), rtol=0, atol=0)
    out, prov = m.denoise(x, 0.6, 3, return_provenance=True)
    assert out.dtype == input_dtype and prov.source_image.shape == (3, 6, 6)
    for f in (m.eps, m.score):
        assert f(x, 0.6, 3).dtype == input_dtype
    empty = m.denoise(x[:0], 0.6, 3)
    assert empty.shape == (0, 1, 6, 6) and empty.dtype == input_dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error where CUDA is missing")
def test_unavailable_devices_are_clear_errors():
    """`.to("cuda")` without CUDA raised torch's AssertionError from inside nn.Module; "meta" was accepted."""
    m = _machine(torch.float32)
    adapter = ELSDenoiser(m)
    for call in (lambda: m.to("cuda"), lambda: adapter.to("cuda"), adapter.cuda, lambda: adapter.to(device="cuda:1")):
        with pytest.raises(ValueError, match="no CUDA device is available"):
            call()
    for call in (
        lambda: m.to("meta"),
        lambda: adapter.to("meta"),
        lambda: elsfast.ScoreMachine(m.images, device="meta"),
    ):
        with pytest.raises(ValueError, match="meta device holds no data"):
            call()
    assert m.device == torch.device("cpu") and m.images.device == torch.device("cpu")  # nothing moved
    assert adapter.to("cpu", F64) is adapter and adapter.machine.dtype == F64 and m.dtype == torch.float32


# ScoreMachine as a torch.nn.Module: buffers, state_dict, adapters that convert their own copy


def _conditional(seed, dtype=torch.float32, uint8=False, backend="torch"):
    g = torch.Generator().manual_seed(seed)
    if uint8:
        images = torch.randint(0, 256, (8, 1, 6, 6), generator=g, dtype=torch.uint8)
    else:
        images = torch.rand(8, 1, 6, 6, generator=g, dtype=F64) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    return elsfast.ScoreMachine(images, labels, dtype=dtype, backend=backend)


def _x(batch=3):
    return torch.randn(batch, 1, 6, 6, generator=torch.Generator().manual_seed(7), dtype=F64)


def test_the_training_set_is_a_buffer_that_moves_with_the_machine():
    m = _conditional(0)
    assert isinstance(m, torch.nn.Module)
    buffers = dict(m.named_buffers())
    assert buffers["images"] is m.images and buffers["labels"] is m.labels and list(m.parameters()) == []
    images = m.images
    assert m.double() is m and m.dtype == F64 and m.images.dtype == F64 and m.labels.dtype == torch.int64
    torch.testing.assert_close(m.images, images.double(), rtol=0, atol=0)
    assert m.to(torch.float32) is m and m.images.dtype == torch.float32 and m.cpu() is m
    for call in (m.half, lambda: m.to(torch.bfloat16), lambda: m.to("cpu", torch.float16)):
        with pytest.raises(ValueError, match=r"torch\.float32 or torch\.float64"):
            call()
    assert m.dtype == torch.float32 and m.images.dtype == torch.float32  # refused before anything changed
    u = _conditional(0, uint8=True).double()
    assert u.images.dtype == torch.uint8 and u.dtype == F64
    x = _x()
    torch.testing.assert_close(m(x, 0.4, 3, [0, 1, 1]), m.denoise(x, 0.4, 3, [0, 1, 1]), rtol=0, atol=0)


def test_to_a_dtype_renews_the_fingerprint_recorded_by_config():
    """The SHA-256 covers the images' bytes: after .double() it must be that of the float64 images, so the
    config saved after the conversion reloads (before: the float32 digest stayed, and the reload was refused)."""
    m = _conditional(0)
    float32_digest = m.fingerprint
    m.double()
    assert m.fingerprint != float32_digest
    again = elsfast.ScoreMachine.from_config(m.config(), train_images=m.images.float(), train_labels=m.labels)
    assert again.fingerprint == m.fingerprint


@pytest.mark.parametrize("uint8, backend", [(False, "torch"), (True, "dedup")])
def test_state_dict_round_trip_carries_the_training_set_by_value(tmp_path, uint8, backend):
    """load_state_dict replaces the training set in place: the per-class subsets, the SHA-256 and the reduction's
    caches (dedup tables, keyed by content) all follow it; through a file loaded with weights_only=True."""
    saved, other = _conditional(0, uint8=uint8, backend=backend), _conditional(1, uint8=uint8, backend=backend)
    x, labels = _x(), [1, 0, 1]
    expected = saved.denoise(x, 0.5, 3, labels)
    before = other.denoise(x, 0.5, 3, labels)  # fills other's class subsets and caches
    assert (before - expected).abs().max() > 0.1
    assert set(saved.state_dict()) == {"images", "labels", "_extra_state"}
    torch.save(saved.state_dict(), tmp_path / "machine.pt")
    other.load_state_dict(torch.load(tmp_path / "machine.pt", weights_only=True))
    torch.testing.assert_close(other.denoise(x, 0.5, 3, labels), expected, rtol=0, atol=0)
    assert other.fingerprint == saved.fingerprint
    reference = _conditional(0, uint8=uint8)  # the exact torch backend, never cached
    torch.testing.assert_close(other.denoise(x, 0.5, 3, labels), reference.denoise(x, 0.5, 3, labels))


def test_a_loaded_training_set_is_checked():
    m = _conditional(0)
    state = m.state_dict()
    state["images"] = state["images"] * 3
    with pytest.raises(ValueError, match="loaded training images"):
        _conditional(1).load_state_dict(state)


def test_state_dict_by_reference_holds_the_dataset_reference_not_the_images():
    m = elsfast.ScoreMachine.from_dataset("mnist-embedded", limit=12, state_dict_training_set="reference")
    state = m.state_dict()
    assert list(state) == ["_extra_state"] and state["_extra_state"]["source"]["limit"] == 12
    same = elsfast.ScoreMachine.from_dataset("mnist-embedded", limit=12, state_dict_training_set="reference", dtype=F64)
    same.load_state_dict(state)  # the same images, computing in float64: the digest is compared in float32
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    labels = m.labels[:2]
    torch.testing.assert_close(same.denoise(x, 0.5, 3, labels), m.denoise(x, 0.5, 3, labels), atol=1e-5, rtol=0)
    fewer = elsfast.ScoreMachine.from_dataset("mnist-embedded", limit=10, state_dict_training_set="reference")
    with pytest.raises(ValueError, match="refers to the training set"):
        fewer.load_state_dict(state)
    by_value = elsfast.ScoreMachine.from_dataset("mnist-embedded", limit=12)
    assert set(by_value.state_dict()) == {"images", "labels", "_extra_state"}
    with pytest.raises(ValueError, match="needs a dataset reference"):
        _conditional(0).state_dict_training_set = "reference"
    with pytest.raises(ValueError, match="'value' or 'reference'"):
        by_value.state_dict_training_set = "copy"


def test_adapters_sharing_a_machine_convert_their_own_copy():
    """`.to()` on one adapter used to convert the shared machine in place, so every other adapter (and the user's
    machine) changed dtype with it."""
    from elsfast.integrations.diffusers import ELSUNet

    m = _conditional(0)
    images = m.images
    first, second = ELSDenoiser(m), ELSDenoiser(m)
    unet = ELSUNet(m)
    x = _x().float()
    expected = second(x, 0.7, class_labels=1)
    assert first.double() is first and first.machine.dtype == F64 and first.machine is not m
    assert m.dtype == torch.float32 and m.images is images and second.machine is m and unet.machine is m
    assert second(x, 0.7, class_labels=1).dtype == torch.float32
    torch.testing.assert_close(second(x, 0.7, class_labels=1), expected, rtol=0, atol=0)
    float64 = ELSDenoiser(_conditional(0).double())  # a machine of its own, converted in place
    torch.testing.assert_close(first(x.double(), 0.7, 1), float64(x.double(), 0.7, 1), rtol=0, atol=0)
    assert unet.to(F64) is unet and unet.machine.dtype == F64 and unet.machine is not first.machine
    assert first.to("cpu", F64).machine is first.machine  # nothing to convert: no new copy
    u = _conditional(0, uint8=True)
    shared = ELSDenoiser(u).double()
    assert shared.machine.images is u.images and u.dtype == torch.float32  # a dtype change copies no uint8 data
    assert [name for name, _ in first.named_buffers()] == ["machine.images", "machine.labels"]
