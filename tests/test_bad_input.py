"""Bad input gets a clear error naming the argument, never a silently wrong result or a raw traceback
(issue 15, items 4-9)."""

import warnings

import numpy as np
import pytest
import torch

import elsfast
from elsfast.cli import main
from elsfast.common.checks import check_device, integer_labels, parse_memory_budget
from elsfast.common.imageio import load_samples
from elsfast.datasets import load
from elsfast.research import creativity


def _machine(conditional: bool = False, **kw) -> elsfast.ScoreMachine:
    g = torch.Generator().manual_seed(0)
    train = torch.rand(6, 1, 5, 5, generator=g) * 2 - 1
    return elsfast.ScoreMachine(train, torch.arange(6) % 3 if conditional else None, **kw)


# ---------------------------------------------------------------------------------------------- item 4


def test_measure_checks_that_the_provenance_is_of_these_samples():
    m = _machine()
    imgs, trace = elsfast.sample(m, n=4, steps=3, progress=False, return_provenance=True)
    _, other = m.denoise(
        torch.randn(8, 1, 5, 5, generator=torch.Generator().manual_seed(1)), 0.5, 3, return_provenance=True
    )
    for prov, n in ((other, 8), (other[:2], 2)):
        with pytest.raises(ValueError, match=rf"provenance is for a batch of shape \[n, H, W\] = \[{n}, 5, 5\]"):
            creativity.measure(m, imgs, provenance=prov)
    measures = creativity.measure(m, imgs, patch_size=trace.patch_sizes[-1], provenance=trace.provenance)
    assert len(measures) == 4


def test_measure_refuses_samples_outside_the_pixel_range():
    m = _machine()
    imgs = elsfast.sample(m, n=2, steps=3, progress=False)
    with pytest.raises(ValueError, match=r"float samples must lie in \[-1, 1\]"):
        creativity.measure(m, imgs * 50)
    with pytest.raises(ValueError, match="samples contains NaN"):
        creativity.measure(m, imgs * float("nan"))
    with pytest.raises(ValueError, match=r"samples are \[C, H, W\]"):
        creativity.measure(m, torch.zeros(2, 1, 4, 4))
    with pytest.warns(UserWarning, match=r"look like \[0, 1\] images.*samples \* 2 - 1"):
        creativity.measure(m, (imgs + 1) / 2)


# ---------------------------------------------------------------------------------------------- item 5


def test_non_integer_labels_are_errors():
    m = _machine(conditional=True)
    x = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"labels must be integers \(class indices\), got 1\.9"):
        m.denoise(x, 0.5, 3, labels=[1.9, 2.0])
    with pytest.raises(ValueError, match=r"labels must be integers \(class indices\), got 1\.7"):
        elsfast.sample(m, n=2, steps=3, labels=1.7, progress=False)
    with pytest.raises(TypeError, match="labels must be integers"):
        m.denoise(x, 0.5, 3, labels=[True, False])
    with pytest.raises(TypeError, match="labels must be an int or a sequence of ints"):
        m.denoise(x, 0.5, 3, labels=["a", "b"])
    torch.testing.assert_close(m.denoise(x, 0.5, 3, labels=[1.0, 2.0]), m.denoise(x, 0.5, 3, labels=[1, 2]))
    assert integer_labels(np.int64(4)).item() == 4


# ---------------------------------------------------------------------------------------------- item 6


def test_float_training_images_in_zero_one_warn_and_out_of_range_refuse():
    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (4, 1, 5, 5), generator=g, dtype=torch.uint8)
    with pytest.warns(UserWarning, match=r"train_images .* look like \[0, 1\] images.*train_images \* 2 - 1"):
        elsfast.ScoreMachine(imgs.float() / 255)
    with pytest.raises(ValueError, match=r"float train_images must lie in \[-1, 1\].*uint8-like values"):
        elsfast.ScoreMachine(imgs.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        elsfast.ScoreMachine(imgs.float() / 127.5 - 1)  # the convention: quiet
        elsfast.ScoreMachine(imgs)


# ---------------------------------------------------------------------------------------------- item 7


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (512 << 20, 512 << 20), ("512M", 512 << 20), ("2G", 2 << 30)])
def test_memory_budget_accepts_ints_and_strings(value, expected):
    assert parse_memory_budget(value) == expected
    assert _machine(memory_budget=value).memory_budget == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-5, ValueError), ("0", ValueError), ("lots", ValueError), (1.5, TypeError), (True, TypeError)],
)
def test_memory_budget_rejects_nonsense_naming_it(value, error):
    with pytest.raises(error, match="memory_budget"):
        _machine(memory_budget=value)


def test_cli_and_api_share_the_byte_parser(tmp_path, capsys):
    from elsfast import cli
    from elsfast.common import checks

    assert cli.parse_bytes is checks.parse_bytes


# ---------------------------------------------------------------------------------------------- item 8


def test_patch_sizes_beyond_the_image_run_at_the_largest_distinct_size():
    """Zero padding: from P = 2 max(H, W) - 1 on every patch covers the whole image, so larger P are the same
    machine; they run at that size (the result equals it exactly)."""
    m = _machine(dtype=torch.float64)
    x = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    largest = m.denoise(x, 0.5, 9)
    for P in (11, 13, 61):
        torch.testing.assert_close(m.denoise(x, 0.5, P), largest, rtol=0, atol=0)
    assert not torch.allclose(m.denoise(x, 0.5, 7), largest)


def test_patch_size_rules_are_the_same_for_every_machine():
    x = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(5))
    for machine, padding in (("is", "zeros"), ("es", "circular"), ("ls", "zeros"), ("els", "circular")):
        m = _machine(machine=machine, padding=padding)
        for bad, error in ((4, ValueError), (0, ValueError), (3.5, ValueError), ("3", TypeError), (None, TypeError)):
            with pytest.raises(error, match="patch_size must be an odd positive integer"):
                m.denoise(x, 0.5, bad)
        m.denoise(x, 0.5, np.int64(3))


# ---------------------------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("machine", ["is", "els"])
def test_an_empty_batch_gives_an_empty_result(machine):
    m = _machine(machine=machine, conditional=True)
    out = m.denoise(torch.zeros(0, 1, 5, 5), 0.5, 3)
    assert out.shape == (0, 1, 5, 5) and out.dtype == torch.float32
    out, prov = m.denoise(torch.zeros(0, 1, 5, 5), 0.5, 3, labels=[], return_provenance=True)
    assert out.shape == (0, 1, 5, 5) and prov.source_image.shape == (0, 5, 5) and prov.entropy.shape == (0, 5, 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="device: CUDA was asked for, but no CUDA device is available"):
        _machine(device="cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        elsfast.sample(torch.zeros(2, 1, 4, 4), n=1, steps=2, device="cuda", progress=False)
    with pytest.raises(ValueError, match="not a torch device"):
        check_device("gpu7")


def test_one_device_resolver_for_the_api_train_and_the_cli(tmp_path, capsys):
    """check_device is the only resolver: "auto" is CUDA when available, else the CPU; train() and the command
    line use it, so a bad device is refused with the same words before any data is read."""
    from elsfast.nets.train import TrainConfig, train

    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert check_device("auto") == check_device(" AUTO ") == auto
    assert check_device(None) is None and check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^argument --device: not a torch device: 'gpu7'"):
        check_device("gpu7", name="argument --device")
    config = TrainConfig(dataset="mnist-embedded", out=str(tmp_path / "net.pt"), device="gpu7")
    with pytest.raises(ValueError, match=r"^device: not a torch device: 'gpu7'"):
        train(config, progress=False)
    assert main(["train", "--out", str(tmp_path / "net.pt"), "--device", "gpu7"]) == 2
    assert "elsfast: error: argument --device: not a torch device: 'gpu7'" in capsys.readouterr().err
    assert not (tmp_path / "net.pt").exists()
    if not torch.cuda.is_available():
        assert main(["sample", "--n", "1", "--device", "cuda", "--out", str(tmp_path / "g.png")]) == 2
        assert "argument --device: CUDA was asked for, but no CUDA device" in capsys.readouterr().err


def test_corrupt_npz_and_foreign_pt_say_what_the_file_is(tmp_path, capsys):
    bad = tmp_path / "data.npz"
    bad.write_bytes(b"\x00garbage that is no zip")
    with pytest.raises(ValueError, match=r"data\.npz is not a readable \.npz archive: it looks like a file of"):
        load(str(bad))
    with pytest.raises(ValueError, match=r"is not a readable \.npz archive"):
        load_samples(bad)
    truncated = tmp_path / "cut.npz"
    np.savez(truncated, samples=np.zeros((2, 1, 4, 4), np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"cut\.npz"):
        load_samples(truncated)
    foreign = tmp_path / "x.pt"
    torch.save({"not": object.__new__(torch.nn.Identity)}, foreign)  # needs unpickling of arbitrary classes
    with pytest.raises(ValueError) as info:
        load_samples(foreign)
    assert "weights_only" not in str(info.value) and "x.pt cannot be read as samples" in str(info.value)
    assert main(["measure", "--samples", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "weights_only" not in err and "Traceback" not in err
    assert main(["sample", "--dataset", str(bad), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "pickled" not in err and "not a readable .npz archive" in err
