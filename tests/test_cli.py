"""The `elsfast` command line, run in-process through `main([...])` and as `python -m elsfast`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import elsfast
import elsfast.sampling
from elsfast.cli import main, parse_bytes
from elsfast.imageio import load_samples
from elsfast.reduce.registry import BackendUnavailable
from elsfast.scales import reference_scales

FAST = ["--limit", "100", "--n", "2", "--steps", "4", "--patch-size", "3", "--device", "cpu", "--quiet"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("elsfast: error: "), err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, err)


@pytest.fixture
def unlabelled_npz(tmp_path: Path) -> Path:
    path = tmp_path / "blobs.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, size=(12, 8, 8), dtype=np.uint8))
    return path


# ------------------------------------------------------------------------------------------------ sample


def test_sample_writes_png_and_samples(tmp_path, capsys):
    out, save = tmp_path / "grid.png", tmp_path / "samples.pt"
    code, stdout, err = run(capsys, "sample", *FAST, "--out", str(out), "--save", str(save))
    assert code == 0, err
    # 2 images of 28 px, upscaled x2 by default, 2 per row, 2 px padding
    with Image.open(out) as im:
        assert im.size == (2 * (56 + 2) + 2, 56 + 2 + 2) and im.mode == "L"
    samples = torch.load(save, weights_only=True)
    assert samples.shape == (2, 1, 28, 28) and samples.dtype == torch.float32
    assert torch.isfinite(samples).all()
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "samples.pt"]  # no temporary files
    summary = stdout.strip().splitlines()
    assert len(summary) == 1 and "2 samples" in summary[0] and str(out) in summary[0]
    assert "[1, 28, 28]" in summary[0]


def test_sample_grid_layout_options(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, _, err = run(capsys, "sample", *FAST, "--nrow", "1", "--scale", "1", "--pad-to", "32", "--out", str(out))
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == (32 + 4, 2 * (32 + 2) + 2)


def test_save_only_writes_no_png(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "sample", *FAST, "--save", "x.npz")
    assert code == 0, err
    assert os.listdir(tmp_path) == ["x.npz"]
    with np.load(tmp_path / "x.npz") as data:
        assert data["samples"].shape == (2, 1, 28, 28)


def test_same_seed_same_samples(tmp_path, capsys):
    paths = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        paths[name] = tmp_path / f"{name}.npz"
        code, _, err = run(capsys, "sample", *FAST, "--seed", seed, "--save", str(paths[name]))
        assert code == 0, err
    a, b, c = (load_samples(paths[k]) for k in "abc")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("labels", ["cycle", "3", "1,7"])
def test_sample_with_labels(tmp_path, capsys, labels):
    save = tmp_path / "s.pt"
    code, _, err = run(capsys, "sample", *FAST, "--labels", labels, "--save", str(save))
    assert code == 0, err
    assert load_samples(save).shape == (2, 1, 28, 28)


def test_calibrated_scales(tmp_path, capsys):
    save = tmp_path / "s.pt"
    argv = [a for a in FAST if a not in ("--patch-size", "3")]
    code, _, err = run(capsys, "sample", *argv, "--scales", "MNIST_UNet_zeros", "--save", str(save))
    assert code == 0, err
    assert load_samples(save).shape == (2, 1, 28, 28)


def test_python_m_elsfast(tmp_path):
    out = tmp_path / "grid.png"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run(
        [sys.executable, "-m", "elsfast", "sample", *FAST, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and "2 samples" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "elsfast", "sample", "--patch-size", "4", "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert_one_line_error(bad.returncode, bad.stderr, "patch size")
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--patch-size", "4"], ["patch size", "odd"]),
        (["--patch-size", "-3"], ["patch size"]),
        (["--machine", "foo"], ["machine", "foo"]),
        (["--padding", "reflect"], ["padding"]),
        (["--machine", "es", "--padding", "zeros"], ["es", "circular"]),
        (["--machine", "es"], ["circular"]),
        (["--scales", "NoSuchList"], ["scales", "NoSuchList"]),
        (["--scales", "MNIST_UNet_zeros", "--patch-size", "3"], ["not allowed"]),
        (["--n", "0"], ["--n"]),
        (["--steps", "1"], ["--steps"]),
        (["--seed", "x"], ["--seed"]),
        (["--schedule", "linear"], ["schedule"]),
        (["--labels", "two"], ["--labels"]),
        (["--labels", "1,2,3"], ["--labels", "one class per sample"]),
        (["--labels", "12"], ["class 12"]),
        (["--labels", "cycle", "--limit", "5", "--n", "3"], ["class 2 has no training images"]),
        (["--dataset", "no-such-dataset"], ["dataset"]),
        (["--backend", "nope"], ["backend", "nope"]),
        (["--device", "nonsense"], ["device"]),
        (["--memory-budget", "lots"], ["memory-budget"]),
        (["--out", "grid.jpg"], [".png"]),
        (["--save", "samples.txt"], ["--save", ".npz"]),
        (["--limit", "0"], ["--limit"]),
        (["--pad-to", "27"], ["pad_to"]),
        (["--frobnicate"], ["unrecognized"]),
    ],
)
def test_bad_sample_arguments(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    base = ["--n", "2", "--steps", "4", "--limit", "100", "--device", "cpu", "--quiet"]
    code, _, err = run(capsys, "sample", *base, *args)
    assert_one_line_error(code, err, *words)
    assert os.listdir(tmp_path) == []  # nothing written


def test_labels_on_unlabelled_dataset(tmp_path, capsys, unlabelled_npz):
    out = tmp_path / "grid.png"
    code, _, err = run(capsys, "sample", *FAST, "--dataset", str(unlabelled_npz), "--labels", "0", "--out", str(out))
    assert_one_line_error(code, err, "labels", "no labels")
    assert not out.exists()
    # the same dataset samples fine unconditionally, at its own size (8 x 8 -> upscaled x2)
    code, _, err = run(capsys, "sample", *FAST, "--dataset", str(unlabelled_npz), "--out", str(out))
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == (2 * (16 + 2) + 2, 16 + 4)


def test_missing_named_dataset(tmp_path, capsys):
    code, _, err = run(capsys, "sample", *FAST, "--dataset", "mnist", "--data-root", str(tmp_path))
    assert_one_line_error(code, err, "not found", "--data-root")


def test_library_errors_are_one_line(tmp_path, capsys, monkeypatch):
    def unavailable(*args, **kwargs):
        raise BackendUnavailable("backend 'fancy' cannot run here: needs CUDA")

    monkeypatch.setattr(elsfast.sampling, "sample", unavailable)
    code, _, err = run(capsys, "sample", *FAST, "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "fancy", "CUDA")
    assert os.listdir(tmp_path) == []


def test_keyboard_interrupt_is_clean(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(elsfast.sampling, "sample", interrupted)
    code, _, err = run(capsys, "sample", *FAST, "--out", str(tmp_path / "g.png"), "--save", str(tmp_path / "s.pt"))
    assert code == 130
    assert err.strip() == "elsfast: interrupted"
    assert os.listdir(tmp_path) == []


def test_no_command_and_help(capsys):
    code, _, err = run(capsys, *[])
    assert_one_line_error(code, err, "required")
    code, out, _ = run(capsys, "sample", "--help")
    assert code == 0 and "usage: elsfast sample" in out and "--patch-size" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and elsfast.__version__ in out


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1024", 1024),
        ("512K", 512 << 10),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("64mb", 64 << 20),
    ],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1M", "0", "2X", "1e9"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_memory_budget_is_used(tmp_path, capsys):
    code, _, err = run(capsys, "sample", *FAST, "--memory-budget", "1M", "--save", str(tmp_path / "s.pt"))
    assert code == 0, err


# ---------------------------------------------------------------------------------------------- info, scales


def test_info(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0, err
    assert f"elsfast {elsfast.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "cpu: yes" in out
    for name in elsfast.backend_names():
        assert f"  {name}: " in out
    assert "mnist-embedded: available" in out
    for name in reference_scales():
        assert name in out


def test_scales(capsys):
    code, out, err = run(capsys, "scales")
    assert code == 0, err
    lines = out.strip().splitlines()
    scales = reference_scales()
    assert len(lines) == len(scales)
    for name, values in scales.items():
        assert any(line.split() == [name, ",".join(map(str, values))] for line in lines)
