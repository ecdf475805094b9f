"""Bad input gets a clear error naming the argument, never a silently wrong result or a raw traceback
(issue 15, items 4-9)."""

import os
import re
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------- issue 27: memory

MEMORY_PROBE = r"""
import resource, sys
import torch, elsfast
from elsfast.reduce.budget import MemoryBudgetError

def vm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))

g = torch.Generator().manual_seed(0)
train = torch.rand(1, 1, 6, 6, generator=g) * 2 - 1
x = torch.randn(9000, 1, 6, 6, generator=g)
m = elsfast.ScoreMachine(train, memory_budget="1M")
m.denoise(x[:2], 0.5, 11)  # loads what the call loads, so that the limit below counts only the working memory
limit = vm() + (100 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
# 9,000 samples' query patches at P = 11 are 157 MB: built at once they exceed the limit
assert m.denoise(x, 0.5, 11).isfinite().all()
for machine, padding, P, shape in [("els", "circular", 1001, 28), ("ls", "circular", 10**6 + 1, 28),
                                   ("es", "circular", 1, 128)]:
    big = elsfast.ScoreMachine(torch.zeros(5, 1, shape, shape), machine=machine, padding=padding)
    try:
        big.denoise(torch.zeros(1, 1, shape, shape), 0.5, P)
    except ValueError as e:
        print(machine, type(e).__name__, e)
print("done")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status for the address space")
def test_working_memory_stays_within_the_budget_under_an_address_space_limit():
    """Under RLIMIT_AS, a batch whose query patches exceed the limit runs in slices (it failed in one allocation
    before), and patch sizes or images whose smallest step cannot fit are refused with the bytes they need."""
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[-1] == "done"
    assert "els ValueError patch_size 1001 is larger than 2 max(H, W) - 1 = 55" in lines[0]
    assert "ls ValueError patch_size 1000001 is larger than 2 max(H, W) - 1 = 55" in lines[1]
    assert re.match(r"es MemoryBudgetError this reduction needs at least [\d.]+ GiB of working memory", lines[2])


def test_one_patch_size_rule_for_every_padding():
    """From P = 2 max(H, W) - 1 a patch covers the image from every centre: zero padding runs larger P at that
    size (the same machine), circular padding refuses them (they only wrap the same pixels in again)."""
    x = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for machine in ("ls", "els"):
        zeros = _machine(machine=machine, dtype=torch.float64)
        torch.testing.assert_close(zeros.denoise(x, 0.5, 10**6 + 1), zeros.denoise(x, 0.5, 9), rtol=0, atol=0)
        circular = _machine(machine=machine, padding="circular", dtype=torch.float64)
        circular.denoise(x, 0.5, 9)
        with pytest.raises(ValueError, match=r"patch_size 11 is larger than 2 max\(H, W\) - 1 = 9 .* <= 9"):
            circular.denoise(x, 0.5, 11)


def test_a_batch_beyond_the_budget_runs_in_slices_with_the_same_result():
    from elsfast.reduce.budget import MEMORY_FLOOR, query_slices

    assert query_slices(10, MEMORY_FLOOR // 8, 1) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]
    assert query_slices(10, 1000, 512 << 20) == [slice(0, 10)]
    with pytest.raises(ValueError, match=r"the queries of a single sample take 64\.0 MiB"):
        query_slices(3, MEMORY_FLOOR // 2, 1)


def test_sample_refuses_a_batch_larger_than_memory_naming_the_bytes(tmp_path, capsys):
    m = elsfast.ScoreMachine(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"n \(samples, --n\) = 1,000,000,000 needs about .* TiB .* at most [\d,]+ "):
        elsfast.sample(m, n=10**9, steps=2, progress=False)
    assert main(["sample", "--n", "100000000000", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert "error: n (samples, --n) = 100,000,000,000 needs about" in capsys.readouterr().err


def test_sample_threads_are_capped_at_the_cpus_available():
    from elsfast.common.threads import available_cpus

    seen = []
    elsfast.sample(_machine(), n=1, steps=3, threads=1000, progress=False,
                   callback=lambda info: seen.append(torch.get_num_threads()))  # fmt: skip
    assert seen and max(seen) <= available_cpus()


# ---------------------------------------------------------------------------------------------- issue 27: reduce


def _reduce_problem():
    from elsfast.reduce import ImageDictionary

    g = torch.Generator().manual_seed(7)
    images = torch.rand(4, 1, 3, 3, generator=g) * 2 - 1
    return torch.randn(1, 2, 9, generator=g), ImageDictionary(images), images


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"abar": 0.0}, ValueError, "abar must lie strictly between 0 and 1"),
        ({"abar": 1.5}, ValueError, "abar must lie strictly between 0 and 1"),
        ({"abar": "0.5"}, TypeError, "abar must be a number"),
        ({"memory_budget": 0}, ValueError, "memory_budget must be a positive number of bytes"),
        ({"memory_budget": 1.5}, TypeError, "memory_budget must be an int"),
        ({"provenance": "yes"}, TypeError, "provenance must be True or False"),
    ],
)
def test_softmax_reduce_checks_its_arguments_like_the_machine(change, error, message):
    queries, dictionary, _ = _reduce_problem()
    kwargs = {"abar": 0.5, **change}
    with pytest.raises(error, match=message):
        elsfast.softmax_reduce(queries, dictionary, **kwargs)


def test_softmax_reduce_checks_its_queries_and_dictionary():
    from elsfast.reduce import ImageDictionary, PatchDictionary

    queries, dictionary, images = _reduce_problem()
    expected = elsfast.softmax_reduce(queries, dictionary, abar=0.5).values
    torch.testing.assert_close(elsfast.softmax_reduce(queries, dictionary, abar=0.5, memory_budget="512M").values,
                               expected, rtol=0, atol=0)  # fmt: skip
    bad_queries = [
        (queries * float("nan"), ValueError, "queries contains NaN"),
        (torch.full_like(queries, 1e38), ValueError, "queries holds values up to 1e.38"),
        (queries[0], ValueError, r"queries must have shape \(G, M, D\)"),
        (queries.long(), TypeError, "queries must be float32 or float64"),
        (queries.half(), TypeError, "queries must be float32 or float64"),
        (queries.numpy(), TypeError, "queries must be a torch tensor"),
        (queries[:, :, :4], ValueError, r"queries have 4 features .* the dictionary's keys 9"),
        (queries.expand(2, 2, 9), ValueError, "queries have 2 groups .* the dictionary 1"),
    ]
    for q, error, message in bad_queries:
        with pytest.raises(error, match=message):
            elsfast.softmax_reduce(q, dictionary, abar=0.5)
    bad_dictionaries = [
        (images, TypeError, "dictionary must be an elsfast.reduce.Dictionary"),
        (ImageDictionary(images.numpy()), TypeError, "dictionary's images must be a torch tensor"),
        (ImageDictionary((images + 1) * 127.5), ValueError, r"float dictionary images must lie in \[-1, 1\]"),
        (ImageDictionary(images.permute(0, 2, 3, 1).expand(4, 3, 3, 1).repeat(1, 2, 2, 1)), ValueError,
         "look channels-last"),
    ]  # fmt: skip
    for d, error, message in bad_dictionaries:
        with pytest.raises(error, match=message):
            elsfast.softmax_reduce(queries, d, abar=0.5)
    positions = torch.arange(9).view(1, 9)
    huge = PatchDictionary(torch.zeros(1, 1, 3, 3), 4001, "circular", positions)
    with pytest.raises(ValueError, match=r"needs at least .* GiB of working memory .* raise memory_budget"):
        elsfast.softmax_reduce(torch.zeros(1, 1, 4001**2), huge, abar=0.5)


# ---------------------------------------------------------------------------------------------- issue 27: holes


@pytest.mark.parametrize("scales", ["nope", "4"])
def test_compare_rejects_bad_scales_with_exit_2(tmp_path, capsys, scales):
    assert main(["compare", "--checkpoint", str(tmp_path / "net.pt"), "--scales", scales,
                 "--out-dir", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "error: argument --scales:" in err and "Traceback" not in err


def test_negative_labels_with_labels_cycle_are_a_clear_error(tmp_path, capsys):
    path = tmp_path / "neg.npz"
    np.savez(path, images=np.zeros((4, 1, 6, 6), np.uint8), labels=-np.arange(1, 5))
    assert main(["sample", "--dataset", str(path), "--labels", "cycle", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "g.png")]) == 2  # fmt: skip
    assert "argument --labels: the labels of" in capsys.readouterr().err


@pytest.mark.parametrize(("seed", "error"), [("abc", TypeError), (1.5, TypeError), (2**70, ValueError)])
def test_bad_seeds_name_seed(tmp_path, capsys, seed, error):
    with pytest.raises(error, match=r"^seed must be an integer"):
        elsfast.sample(_machine(), n=1, steps=2, seed=seed, progress=False)
    assert main(["sample", "--seed", str(seed), "--n", "1", "--steps", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert "error: argument --seed:" in capsys.readouterr().err


def test_sample_takes_numpy_noise_and_names_unknown_keywords():
    m = _machine()
    noise = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(8))
    from_numpy = elsfast.sample(m, n=2, steps=3, noise=noise.numpy(), progress=False)
    torch.testing.assert_close(from_numpy, elsfast.sample(m, n=2, steps=3, noise=noise, progress=False), rtol=0, atol=0)
    with pytest.raises(TypeError, match="noise must be a float tensor"):
        elsfast.sample(m, n=2, steps=3, noise=noise.long().numpy(), progress=False)
    with pytest.raises(TypeError, match=r"^sample\(\) got unexpected keyword\(s\) foo$"):
        elsfast.sample(m, foo=1)


def test_measure_checks_its_machine_batch_and_provenance():
    m = _machine()
    assert creativity.measure(m, torch.zeros(0, 1, 5, 5)) == []
    with pytest.raises(TypeError, match="machine must be the ScoreMachine"):
        creativity.measure(None, torch.zeros(2, 1, 5, 5))
    with pytest.raises(TypeError, match="provenance must be an elsfast Provenance"):
        creativity.measure(m, torch.zeros(2, 1, 5, 5), provenance=torch.zeros(2, 5, 5))


def test_elsunet_checks_patch_sizes_and_names_a_corrupt_config(tmp_path):
    pytest.importorskip("diffusers")
    from elsfast.integrations.diffusers import ELSUNet

    for bad in (4, [3, 4]):
        with pytest.raises(ValueError, match="patch_size must be an odd positive integer, got 4"):
            ELSUNet(_machine(), patch_size=bad)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not a readable ELSUNet config"):
        ELSUNet.from_pretrained(tmp_path)


def test_channels_last_and_huge_inputs_are_refused():
    with pytest.raises(ValueError, match=r"look channels-last .* train_images\.permute\(0, 3, 1, 2\)"):
        elsfast.ScoreMachine(torch.zeros(3, 28, 28, 1))
    elsfast.ScoreMachine(torch.zeros(3, 2, 5, 3))  # two channels of 5 x 3: not channels-last
    m = _machine()
    with pytest.raises(ValueError, match=r"x holds values up to 1e\+38"):
        m.denoise(torch.full((1, 1, 5, 5), 1e38), 0.5, 3)
    assert m.denoise(torch.full((1, 1, 5, 5), 1e9), 0.9999, 3).isfinite().all()


def test_bf16_on_a_cpu_warns(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out, missing = tmp_path / "net.pt", tmp_path / "missing.npz"  # the warning comes before the data is read
    assert main(["train", "--out", str(out), "--bf16", "--dataset", str(missing), "--quiet"]) == 2
    assert "warning: --bf16 is bfloat16 autocast on CUDA only" in capsys.readouterr().err


def test_info_says_where_it_looked_for_datasets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ELSFAST_DATA", str(tmp_path))
    assert main(["info"]) == 0
    assert f"mnist: not found under {tmp_path} (the data root, from $ELSFAST_DATA)" in capsys.readouterr().out
    monkeypatch.delenv("ELSFAST_DATA")
    assert main(["info"]) == 0
    assert "mnist: not found: no data root (pass --data-root DIR or set $ELSFAST_DATA)" in capsys.readouterr().out
