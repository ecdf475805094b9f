"""elsfast.common.imageio: uint8 conversion, grids, atomic PNG and sample files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from elsfast.common.fileio import MANIFEST_NAME, atomic_write
from elsfast.common.imageio import load_samples, make_grid, save_grid, save_samples, to_uint8


def _listing(directory) -> list[str]:
    """The files in `directory`, sorted, without elsfast's record of the files it wrote there."""
    return sorted(name for name in os.listdir(directory) if name != MANIFEST_NAME)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------------ to_uint8


def test_to_uint8_maps_minus_one_zero_one():
    x = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 1, 3, 1)
    assert u[0, 0, :, 0].tolist() == [0, 128, 255]


def test_to_uint8_clamps_and_handles_nan():
    x = torch.tensor([-5.0, 7.0, float("nan"), -0.5, 0.5]).reshape(1, 1, 1, 5)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 255, 128, 64, 191]


def test_to_uint8_is_channels_last():
    x = torch.full((2, 3, 4, 5), -1.0)
    x[:, 1] = 1.0  # green channel on
    u = to_uint8(x)
    assert u.shape == (2, 4, 5, 3)
    assert (u[..., 0] == 0).all() and (u[..., 1] == 255).all() and (u[..., 2] == 0).all()


def test_to_uint8_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N, C, H, W"):
        to_uint8(torch.zeros(3, 4, 4))


# ------------------------------------------------------------------------------------------------ make_grid


@pytest.mark.parametrize(
    ("n", "nrow", "padding", "scale", "rows", "cols"),
    [
        (1, None, 2, 1, 1, 1),
        (2, None, 2, 2, 1, 2),
        (5, None, 2, 1, 2, 3),  # ceil(sqrt(5)) = 3 per row
        (16, None, 0, 3, 4, 4),
        (7, 7, 1, 1, 1, 7),
        (7, 2, 3, 2, 4, 2),
    ],
)
def test_grid_shape(n, nrow, padding, scale, rows, cols):
    h, w = 6, 4
    grid = make_grid(torch.zeros(n, 1, h, w), nrow=nrow, padding=padding, scale=scale)
    assert grid.dtype == np.uint8
    assert grid.shape == (rows * (h * scale + padding) + padding, cols * (w * scale + padding) + padding, 1)


def test_grid_content_and_nearest_neighbour_scaling():
    images = torch.rand(3, 1, 5, 4) * 2 - 1
    grid = make_grid(images, nrow=2, padding=1, scale=2, pad_value=7)
    u = to_uint8(images)
    tile = lambda k: u[k].repeat(2, axis=0).repeat(2, axis=1)  # noqa: E731
    assert np.array_equal(grid[1:11, 1:9], tile(0))
    assert np.array_equal(grid[1:11, 10:18], tile(1))
    assert np.array_equal(grid[12:22, 1:9], tile(2))
    assert (grid[12:22, 10:18] == 7).all()  # empty cell of the last row
    assert (grid[0] == 7).all() and (grid[:, 9] == 7).all()  # padding lines


def test_grid_grey_and_rgb():
    assert make_grid(torch.zeros(4, 1, 3, 3)).shape[2] == 1
    rgb = make_grid(torch.zeros(4, 3, 3, 3), padding=0)
    assert rgb.shape == (6, 6, 3)
    with pytest.raises(ValueError, match="channels"):
        make_grid(torch.zeros(4, 2, 3, 3))


@pytest.mark.parametrize("kw", [{"nrow": 0}, {"scale": 0}, {"padding": -1}, {"scale": 1.5}])
def test_grid_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        make_grid(torch.zeros(2, 1, 3, 3), **kw)


def test_grid_rejects_empty():
    with pytest.raises(ValueError, match="at least one"):
        make_grid(torch.zeros(0, 1, 3, 3))


# ------------------------------------------------------------------------------------------------ save_grid


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_save_grid_writes_png_atomically(tmp_path, channels, mode):
    images = torch.rand(5, channels, 7, 6) * 2 - 1
    path = tmp_path / "nested" / "dir" / "grid.png"  # the directory is created
    assert save_grid(images, path, nrow=3, scale=2) == path
    assert _listing(path.parent) == ["grid.png"]  # no temporary file left behind
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == mode
        pixels = np.asarray(im)
    expected = make_grid(images, nrow=3, scale=2)
    assert np.array_equal(pixels.reshape(expected.shape), expected)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # an ordinary file, not a 0600 temp file


def test_save_grid_failure_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    atomic_write(path, lambda f: f.write(b"old"), kind="grid")  # an earlier grid of elsfast: it may be replaced

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_grid(torch.zeros(2, 1, 4, 4), path)
    assert _listing(tmp_path) == ["grid.png"] and path.read_bytes() == b"old"


def test_save_grid_requires_png_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        save_grid(torch.zeros(1, 1, 4, 4), tmp_path / "grid.jpg")
    assert _listing(tmp_path) == []


def test_save_grid_refuses_a_directory(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(IsADirectoryError):
        save_grid(torch.zeros(1, 1, 4, 4), tmp_path / "d.png")


# ---------------------------------------------------------------------------------------------- save_samples


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_save_samples_round_trip(tmp_path, suffix):
    x = torch.randn(3, 1, 5, 5)
    path = save_samples(x, tmp_path / "out" / f"samples{suffix}")
    assert _listing(path.parent) == [path.name]
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)
    else:
        with np.load(path) as data:
            assert data.files == ["samples"]
            raw = torch.from_numpy(data["samples"])
    assert raw.dtype == torch.float32 and torch.equal(raw, x)
    assert torch.equal(load_samples(path), x)


def test_save_samples_bad_suffix(tmp_path):
    for name in ("samples.png", "samples", "samples.npy"):
        with pytest.raises(ValueError, match=r"\.pt or \.npz"):
            save_samples(torch.zeros(1, 1, 2, 2), tmp_path / name)
    assert _listing(tmp_path) == []


def test_atomic_write_cleans_up_on_interrupt(tmp_path):
    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.npz", interrupted)
    assert _listing(tmp_path) == []


def test_grid_value_range_maps_lo_to_black_and_hi_to_white(tmp_path):
    """`value_range=(0, 1)` reads a diffusers pipeline's [0, 1] images as `(-1, 1)` reads elsfast's samples."""
    from elsfast.common.imageio import make_grid, save_grid

    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    np.testing.assert_array_equal(make_grid(x, padding=0), make_grid((x + 1) / 2, padding=0, value_range=(0, 1)))
    np.testing.assert_array_equal(make_grid(x, padding=0)[0, :, 0], [0, 64, 128, 255, 255])
    np.testing.assert_array_equal(make_grid(x * 10, padding=0, value_range=(-10, 10)), make_grid(x, padding=0))
    with pytest.raises(ValueError, match="value_range"):
        make_grid(x, value_range=(1, 1))
    path = save_grid((x + 1) / 2, tmp_path / "g.png", padding=0, value_range=(0, 1))
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(path)), make_grid(x, padding=0)[:, :, 0])
