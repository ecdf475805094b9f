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
    assert adapter.to("cpu", F64) is adapter and m.dtype == F64
