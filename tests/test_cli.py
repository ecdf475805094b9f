"""The `elsfast` command line, run in-process through `main([...])` and as `python -m elsfast`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import elsfast
import elsfast.machine
import elsfast.sampling
from elsfast.cli import main, parse_bytes
from elsfast.common.fileio import MANIFEST_NAME
from elsfast.common.imageio import load_samples
from elsfast.common.scales import reference_scales
from elsfast.reduce.registry import BackendUnavailable

FAST = ["--limit", "100", "--n", "2", "--steps", "4", "--patch-size", "3", "--device", "cpu", "--quiet"]


def _listing(directory) -> list[str]:
    """The files in `directory`, sorted, without elsfast's record of the files it wrote there."""
    return sorted(name for name in os.listdir(directory) if name != MANIFEST_NAME)


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
    assert _listing(tmp_path) == ["grid.png", "samples.pt"]  # no temporary files
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
    assert _listing(tmp_path) == ["x.npz"]
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


@pytest.mark.parametrize("name", ["MNIST_UNet_zeros", "MNIST_UNet_zeros:shifted"])
def test_calibrated_scales(tmp_path, capsys, name):
    save = tmp_path / "s.pt"
    argv = [a for a in FAST if a not in ("--patch-size", "3")]
    code, _, err = run(capsys, "sample", *argv, "--scales", name, "--save", str(save))
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
        (["--scales", "MNIST_UNet_zeros:sideways"], ["reading", "sideways"]),
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
    assert _listing(tmp_path) == []  # nothing written


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
    assert _listing(tmp_path) == []


def test_keyboard_interrupt_is_clean(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(elsfast.sampling, "sample", interrupted)
    code, _, err = run(capsys, "sample", *FAST, "--out", str(tmp_path / "g.png"), "--save", str(tmp_path / "s.pt"))
    assert code == 130
    assert err.strip() == "elsfast: interrupted"
    assert _listing(tmp_path) == []


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


def test_memory_budget_is_used(tmp_path, capsys, monkeypatch):
    """--memory-budget 1M reaches every reduction the sampler runs (1 MiB, not the 512 MiB default)."""
    budgets = []
    reduce = elsfast.machine.softmax_reduce

    def spy(*args, **kwargs):
        budgets.append(kwargs["memory_budget"])
        return reduce(*args, **kwargs)

    monkeypatch.setattr(elsfast.machine, "softmax_reduce", spy)
    code, _, err = run(capsys, "sample", *FAST, "--memory-budget", "1M", "--save", str(tmp_path / "s.pt"))
    assert code == 0, err
    assert budgets and set(budgets) == {1 << 20}, sorted(set(budgets))


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


# ------------------------------------------------------------------------------------------------ explain, measure

SMALL = ["--limit", "50", "--steps", "4", "--device", "cpu"]


def test_explain_writes_figures_and_measures(tmp_path, capsys):
    out = tmp_path / "why"
    code, stdout, err = run(capsys, "explain", *SMALL, "--n", "2", "--seed", "5", "--quiet", "--out-dir", str(out))
    assert code == 0, err
    assert _listing(out) == ["measures.json", "sample_0.png", "sample_1.png"]
    with Image.open(out / "sample_0.png") as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 300
    measures = json.loads((out / "measures.json").read_text())
    assert [m["sample"] for m in measures] == [0, 1] and {m["seed"] for m in measures} == {5}
    assert measures[0]["patch_sizes"] == [3, 3, 3] and measures[0]["train_shape"] == [50, 1, 28, 28]
    lines = stdout.strip().splitlines()
    assert len(lines) == 3
    for k, line in enumerate(lines[:2]):
        m = measures[k]
        assert line.startswith(f"sample {k}: nearest training image #{m['nearest_training_index']}")
        for words in ("RMS", "memorised", "distinct sources", "largest region", "local consistency"):
            assert words in line
        assert str(out / f"sample_{k}.png") in line
    assert "explained 2 samples" in lines[2] and "measures.json" in lines[2]


def test_explain_options(tmp_path, capsys):
    out = tmp_path / "why"
    argv = [*SMALL, "--n", "2", "--labels", "1,7", "--machine", "ls", "--patch-size", "5", "--top", "2"]
    code, _, err = run(capsys, "explain", *argv, "--scale", "2", "--quiet", "--out-dir", str(out))
    assert code == 0, err
    measures = json.loads((out / "measures.json").read_text())
    assert [m["label"] for m in measures] == [1, 7] and measures[0]["machine"] == "ls"
    assert measures[0]["patch_sizes"] == [5, 5, 5]


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_measure_saved_samples(tmp_path, capsys, suffix):
    saved, out = tmp_path / f"s{suffix}", tmp_path / "m.json"
    code, _, err = run(capsys, "sample", *SMALL, "--n", "3", "--quiet", "--save", str(saved))
    assert code == 0, err
    code, stdout, err = run(
        capsys, "measure", *SMALL[:2], "--samples", str(saved), "--json", str(out), "--device", "cpu"
    )
    assert code == 0, err
    measures = json.loads(out.read_text())
    assert [m["sample"] for m in measures] == [0, 1, 2]
    for m in measures:
        assert m["patch_size"] == 3 and m["samples_file"] == str(saved) and 0 <= m["local_consistency"] <= 1
        assert sum(m["region_sizes"]) == 28 * 28
    lines = stdout.strip().splitlines()
    assert len(lines) == 5  # header, 3 samples, summary
    assert lines[0].split() == ["sample", "nearest", "RMS", "memorised", "sources", "largest", "consistency", "entropy"]
    assert lines[1].split()[:2] == ["0", f"#{measures[0]['nearest_training_index']}"]
    assert "measured 3 samples" in lines[4] and str(out) in lines[4]
    assert _listing(tmp_path) == sorted(["m.json", saved.name])  # no temporary files


def test_measure_labels_and_padding(tmp_path, capsys):
    saved = tmp_path / "s.pt"
    code, _, err = run(capsys, "sample", *SMALL, "--n", "2", "--pad-to", "32", "--quiet", "--save", str(saved))
    assert code == 0, err
    argv = ["--limit", "50", "--device", "cpu", "--pad-to", "32", "--labels", "cycle"]
    code, stdout, err = run(capsys, "measure", *argv, "--samples", str(saved))
    assert code == 0, err
    assert "measured 2 samples [1, 32, 32]" in stdout


@pytest.fixture
def saved_samples(tmp_path) -> Path:
    path = tmp_path / "s.pt"
    torch.save(torch.zeros(2, 1, 28, 28), path)
    return path


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--samples", "missing.pt"], ["--samples", "no such file"]),
        (["--samples", "samples.txt"], ["--samples", ".npz"]),
        (["--pad-to", "32"], ["[1, 28, 28]", "[1, 32, 32]"]),
        (["--patch-size", "4"], ["patch size", "odd"]),
        (["--labels", "1,2,3"], ["--labels", "one class per sample"]),
        (["--scales", "MNIST_UNet_zeros"], ["unrecognized"]),
        (["--machine", "es"], ["circular"]),
        (["--dataset", "no-such-dataset"], ["dataset"]),
    ],
)
def test_bad_measure_arguments(tmp_path, capsys, monkeypatch, saved_samples, args, words):
    monkeypatch.chdir(tmp_path)
    samples = [] if "--samples" in args else ["--samples", str(saved_samples)]
    code, _, err = run(capsys, "measure", "--limit", "50", "--device", "cpu", *samples, *args, "--json", "m.json")
    assert_one_line_error(code, err, *words)
    assert _listing(tmp_path) == ["s.pt"]  # nothing written


def test_measure_unreadable_samples(tmp_path, capsys):
    bad, wrong = tmp_path / "bad.pt", tmp_path / "wrong.pt"
    bad.write_bytes(b"not a tensor file")
    torch.save({"samples": torch.zeros(1)}, wrong)
    code, _, err = run(capsys, "measure", "--limit", "50", "--samples", str(bad))
    assert_one_line_error(code, err, "--samples", "cannot read")
    code, _, err = run(capsys, "measure", "--limit", "50", "--samples", str(wrong))
    assert_one_line_error(code, err, "--samples", "[n, C, H, W]")
    code, _, err = run(capsys, "measure", "--limit", "50")
    assert_one_line_error(code, err, "--samples", "required")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--patch-size", "4"], ["patch size", "odd"]),
        (["--labels", "1,2,3"], ["--labels", "one class per sample"]),
        (["--machine", "es"], ["circular"]),
        (["--top", "0"], ["--top"]),
        (["--out-dir", "file.txt"], ["--out-dir", "not a directory"]),
        ([], ["--out-dir", "required"]),
    ],
)
def test_bad_explain_arguments(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    out = [] if args == [] or "--out-dir" in args else ["--out-dir", "why"]
    code, _, err = run(capsys, "explain", *SMALL, "--n", "2", "--quiet", *out, *args)
    assert_one_line_error(code, err, *words)
    assert _listing(tmp_path) == ["file.txt"]  # nothing written


def test_explain_library_errors_are_one_line(tmp_path, capsys, monkeypatch):
    def unavailable(*args, **kwargs):
        raise BackendUnavailable("backend 'fancy' cannot run here: needs CUDA")

    monkeypatch.setattr(elsfast.sampling, "sample", unavailable)
    code, _, err = run(capsys, "explain", *SMALL, "--quiet", "--out-dir", str(tmp_path / "why"))
    assert_one_line_error(code, err, "fancy", "CUDA")
    assert _listing(tmp_path) == []


def test_sample_resumes_from_its_checkpoint(tmp_path, capsys):
    """A crashed `elsfast sample` leaves `OUT.ckpt`; the same command run again resumes from it."""
    data = elsfast.datasets.load("mnist-embedded", limit=40)
    m = elsfast.ScoreMachine(data.images, data.labels)
    out = tmp_path / "grid.png"

    def crash(info):
        if info["i"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        elsfast.sample(m, n=2, steps=5, patch_size=3, progress=False, seed=0, resume_from=f"{out}.ckpt", callback=crash)
    ckpt = Path(f"{out}.ckpt")
    # mark the saved state, so that a resumed run is told apart from one that started over
    state = torch.load(ckpt, weights_only=True)
    state["x"] = torch.zeros_like(state["x"])
    torch.save(state, ckpt)
    torch.save(state, tmp_path / "copy.ckpt")
    args = ["sample", "--limit", "40", "--n", "2", "--steps", "5", "--quiet", "--out", str(out)]
    assert main([*args, "--save", str(tmp_path / "s.pt")]) == 0
    assert not ckpt.exists()
    resumed = elsfast.sample(m, n=2, steps=5, patch_size=3, progress=False, seed=0, resume_from=tmp_path / "copy.ckpt")
    torch.testing.assert_close(load_samples(tmp_path / "s.pt"), resumed, rtol=0, atol=0)
    assert not torch.equal(resumed, elsfast.sample(m, n=2, steps=5, patch_size=3, progress=False, seed=0))
    assert main([*args, "--resume-from", "none"]) == 0
    assert not list(tmp_path.glob("*.ckpt"))


def test_sample_with_the_valid_dictionary(tmp_path, capsys):
    from elsfast.cli import main

    argv = ["sample", "--limit", "30", "--n", "1", "--steps", "3", "--patch-size", "3", "--device", "cpu", "--quiet"]
    assert main([*argv, "--dictionary", "valid", "--out", str(tmp_path / "valid.png")]) == 0
    assert (tmp_path / "valid.png").exists()
    assert main([*argv, "--machine", "ls", "--dictionary", "valid", "--out", str(tmp_path / "ls.png")]) == 2
    assert "--dictionary" in capsys.readouterr().err and not (tmp_path / "ls.png").exists()
