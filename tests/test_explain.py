"""`elsfast.research.explain`: the per-sample figure (checked on hand-made provenance) and `explain()` end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from elsfast import Provenance, ScoreMachine
from elsfast.common.fileio import MANIFEST_NAME
from elsfast.common.imageio import to_uint8
from elsfast.plots.provenance import provenance_panels
from elsfast.research.explain import PALETTE, explain, explain_figure, palette_colour, save_explain_figure

pytest.importorskip("matplotlib")


def _listing(directory) -> list[str]:
    """The files in `directory`, sorted, without elsfast's record of the files it wrote there."""
    return sorted(name for name in os.listdir(directory) if name != MANIFEST_NAME)


def make_provenance(source_image, source_y=None, source_x=None, entropy=None) -> Provenance:
    """A one-sample provenance `[H, W]`; sources default to the pixel itself (no offsets)."""
    source_image = torch.as_tensor(source_image, dtype=torch.int64)
    H, W = source_image.shape
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return Provenance(
        source_image,
        ys.clone() if source_y is None else torch.as_tensor(source_y, dtype=torch.int64),
        xs.clone() if source_x is None else torch.as_tensor(source_x, dtype=torch.int64),
        torch.ones(H, W),
        torch.zeros(H, W) if entropy is None else entropy,
    )


@pytest.fixture
def grey_train() -> torch.Tensor:
    return torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 4, 4).contiguous()


def test_figure_is_a_sensible_picture(grey_train, tmp_path):
    sample = torch.zeros(1, 4, 4)
    prov = make_provenance(torch.tensor([[5, 5, 5, 2]] * 4))
    panels = provenance_panels(sample, prov, grey_train, scale=4)
    assert [index for index, _, _ in panels.tops] == [5, 2]  # only two source images
    assert panels.tops[0][2].shape == (16, 16, 3)  # 4 px upscaled x4
    # grey stays grey: the sample (0.0 -> 128) and a grey training image
    assert (panels.sample == 128).all() and panels.sample.shape == (4, 4, 3)
    top = panels.tops[0][2]
    assert (top[..., 0] == top[..., 1]).mean() > 0.5
    figure = explain_figure(sample, prov, grey_train, scale=4)
    titles = {ax.get_title() for ax in figure.get_axes()}
    assert {"(a) sample", "(b) source image of each pixel", "#5: 75.0% (12 px)", "#2: 25.0% (4 px)"} <= titles
    path = save_explain_figure(tmp_path / "f.png", sample, prov, grey_train, scale=4)
    with Image.open(path) as im:
        assert im.format == "PNG" and 600 < im.width < 3000 and 400 < im.height < 2000


def test_source_map_colours_follow_pixel_counts(grey_train):
    # image 5 provides 9 pixels, image 2 provides 5, image 0 provides 2
    grid = torch.tensor([[5, 5, 5, 2], [5, 5, 5, 2], [5, 5, 5, 2], [0, 0, 2, 2]])
    panels = provenance_panels(torch.zeros(1, 4, 4), make_provenance(grid), grey_train, scale=3, top=2)
    assert panels.sources == [(5, 9), (2, 5), (0, 2)]
    rank = {5: 0, 2: 1, 0: 2}
    expected = np.array([[palette_colour(rank[v]) for v in row] for row in grid.tolist()], dtype=np.uint8)
    assert np.array_equal(panels.source, expected)
    assert palette_colour(0) == PALETTE[0] and palette_colour(25) not in PALETTE
    assert [index for index, _, _ in panels.tops] == [5, 2]  # top=2


def test_outline_of_the_contributing_region():
    train = torch.zeros(3, 1, 6, 6)  # mid grey everywhere
    # every pixel of the sample comes from image 1, from its 2 x 2 block at rows 1-2, columns 1-2
    ys = torch.tensor([[1, 1, 2, 2, 1, 2]] * 6)
    xs = ys.T.clone()
    prov = make_provenance(torch.ones(6, 6, dtype=torch.int64), ys, xs)
    scale = 4
    picture = provenance_panels(torch.zeros(1, 6, 6), prov, train, scale=scale).tops[0][2]
    assert picture.shape == (6 * scale, 6 * scale, 3)
    drawn = (picture == np.array(PALETTE[0], dtype=np.uint8)).all(axis=2)
    expected = np.zeros((6 * scale, 6 * scale), dtype=bool)
    lo, hi = 1 * scale, 3 * scale - 1  # the block in upscaled pixels
    expected[lo : hi + 1, [lo, hi]] = True
    expected[[lo, hi], lo : hi + 1] = True
    assert np.array_equal(drawn, expected)
    # the region keeps its pixels (grey 128); outside it is washed towards another grey
    assert (picture[lo + 1 : hi, lo + 1 : hi] == 128).all()
    assert (picture[0, 0] != 128).all()


def test_offset_map(grey_train):
    zero = provenance_panels(torch.zeros(1, 4, 4), make_provenance(torch.zeros(4, 4)), grey_train)
    assert (zero.offset == 0).all() and zero.largest_offset == 0  # no offsets: black
    # every pixel's source is one column to the right, circularly: the last column's source is 3 to the left
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    right = make_provenance(torch.zeros(4, 4), ys, (xs + 1) % 4)
    colours = provenance_panels(torch.zeros(1, 4, 4), right, grey_train).offset
    assert (colours[:, 3] == [0, 255, 255]).all()  # direction pi: hue 1/2 (cyan); the largest: full brightness
    assert (colours[:, :3] == [128, 0, 0]).all()  # direction 0: hue 0 (red); a third of it: 0.25 + 0.75 / 3
    wrapped = provenance_panels(torch.zeros(1, 4, 4), right, grey_train, wrap=True)
    assert (wrapped.offset == [255, 0, 0]).all() and wrapped.largest_offset == 1  # circular: one to the right


def test_entropy_maps_over_time(grey_train):
    K = 10
    entropy = torch.zeros(K, 4, 4)
    entropy[:, 0, 0] = torch.arange(K, 0, -1).float()  # the largest value (10) at the first step
    times = [(K - i) / (K + 1) for i in range(K)]
    prov = make_provenance(torch.zeros(4, 4))
    panels = provenance_panels(torch.zeros(1, 4, 4), prov, grey_train, entropy_over_time=entropy, times=times)
    assert panels.entropy.shape == (6, 4, 4)  # up to 6 maps, the first and the final step among them
    assert panels.entropy[0, 0, 0] == 10 and panels.entropy_max == 10 and panels.entropy[-1, 0, 0] == 1
    assert panels.entropy_titles[0] == f"t = {times[0]:.2f}" and panels.entropy_titles[-1].endswith("(final)")
    xs, mean, unit = panels.entropy_curve
    assert unit == "t" and np.allclose(xs, times) and np.allclose(mean, np.arange(K, 0, -1) / 16)
    with pytest.raises(ValueError, match="times"):
        provenance_panels(torch.zeros(1, 4, 4), prov, grey_train, entropy_over_time=entropy, times=[0.5])
    # without a trace, the provenance's own entropy is the one map
    alone = provenance_panels(torch.zeros(1, 4, 4), prov, grey_train)
    assert alone.entropy.shape == (1, 4, 4) and alone.entropy_curve is None


def test_rgb_sample_and_bad_inputs():
    train = torch.rand(2, 3, 5, 5) * 2 - 1
    sample = train[1]
    prov = make_provenance(torch.ones(5, 5, dtype=torch.int64))
    assert np.array_equal(provenance_panels(sample, prov, train, scale=1).sample, to_uint8(sample[None])[0])
    batch = Provenance(*(getattr(prov, f)[None].expand(2, 5, 5) for f in prov.__dataclass_fields__))
    with pytest.raises(ValueError, match="one sample"):
        explain_figure(sample, batch, train)
    provenance_panels(sample, batch[:1], train)  # a batch of one is fine
    with pytest.raises(ValueError, match="train_images"):
        explain_figure(sample, prov, train[:, :1])
    with pytest.raises(ValueError, match="training image 7"):
        explain_figure(sample, make_provenance(torch.full((5, 5), 7)), train)
    with pytest.raises(ValueError, match=r"\.png"):
        save_explain_figure("figure.jpg", sample, prov, train)


def test_explain_writes_figures_and_measures(tmp_path):
    train = torch.stack([-torch.ones(1, 16, 16), torch.ones(1, 16, 16)])
    machine = ScoreMachine(train, machine="els", padding="circular")
    out = tmp_path / "why"
    measures = explain(machine, 2, seed=3, steps=4, patch_size=3, out_dir=out, progress=False)
    assert _listing(out) == ["measures.json", "sample_0.png", "sample_1.png"]  # no temporary files
    for k in range(2):
        with Image.open(out / f"sample_{k}.png") as im:
            assert im.format == "PNG" and im.size[0] > 200
    saved = json.loads((out / "measures.json").read_text())
    assert saved == measures and len(saved) == 2
    for k, m in enumerate(saved):
        assert m["sample"] == k and m["seed"] == 3 and m["figure"] == f"sample_{k}.png"
        assert m["machine"] == "els" and m["padding"] == "circular" and m["steps"] == 4
        assert m["patch_sizes"] == [3, 3, 3] and len(m["times"]) == 3
        assert m["train_shape"] == [2, 1, 16, 16] and m["train_sha256"] == machine.fingerprint
        assert 0 <= m["nearest_training_index"] < 2 and 0 <= m["local_consistency"] <= 1
        assert m["distinct_sources"] in (1, 2) and sum(m["region_sizes"]) == 256
        assert 0 <= m["nearest_training_rms"] <= 2**0.5 + 1e-6  # a mosaic of black and white


def test_explain_conditional(tmp_path):
    train = torch.stack([-torch.ones(1, 8, 8), torch.ones(1, 8, 8), -torch.ones(1, 8, 8)])
    machine = ScoreMachine(train, [0, 1, 0], machine="ls", padding="zeros")
    measures = explain(machine, 2, steps=3, labels=[1, 0], out_dir=tmp_path, progress=False)
    assert [m["label"] for m in measures] == [1, 0]
    assert measures[0]["nearest_training_index"] == 1 and measures[0]["memorised"]
    assert measures[1]["nearest_training_index"] in (0, 2)
