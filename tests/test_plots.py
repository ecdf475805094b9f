"""`elsfast.plots`: every figure writes a valid PNG, SVG and PDF chosen by the extension, refuses a file elsfast did
not write, and without matplotlib fails with the install command while the numbers of calibrate/compare/explain
are still produced."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("matplotlib")

from elsfast.common.provenance import Provenance
from elsfast.plots.calibration import save_calibration_figure
from elsfast.plots.comparison import save_r_histogram, save_r_scatter
from elsfast.plots.departure import save_departure_figure, save_worst_seeds_figure
from elsfast.plots.provenance import save_provenance_figure
from elsfast.research.calibrate import CalibrationResult

FOREIGN = b"a user's own picture"


def _calibration_args():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 5, 7]
    cosine = torch.rand(4, 6, 3, generator=g, dtype=torch.float64)
    cosine[:, 0] = float("nan")
    best = torch.tensor(sizes)[cosine[:, 1:].argmax(dim=2)]
    best = torch.cat([torch.zeros(4, 1, dtype=torch.int64), best], dim=1)
    return sizes, cosine, best, [3, 3, 5, 5, 7, 7]


def _provenance_args():
    g = torch.Generator().manual_seed(1)
    train = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    source = torch.arange(64).view(8, 8) % 3
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    prov = Provenance(source, (ys + 1) % 8, xs.clone(), torch.ones(8, 8), torch.rand(8, 8, generator=g))
    entropy = torch.rand(5, 8, 8, generator=g)
    return (train[0], prov, train), {"entropy_over_time": entropy, "times": [0.9, 0.7, 0.5, 0.3, 0.1]}


R = {"els": [0.9, 0.95, float("nan"), 0.8], "ls": [0.5, 0.4, 0.6, None], "is": [0.2, 0.3, 0.1, 0.25]}


def _departure_panels(n: int = 2) -> list[dict]:
    """Seeds of `elsfast.plots.departure`'s figures: images, a departure map, a provenance and numbers."""
    g = torch.Generator().manual_seed(3)
    (sample, prov, _), _ = _provenance_args()
    return [
        {"network": sample, "machine_image": sample.flip(-1), "departure": torch.rand(8, 8, generator=g),
         "provenance": prov, "seed": k, "r": 0.5 + 0.1 * k, "contrast": {"ratio": 1.5}}
        for k in range(n)
    ]  # fmt: skip


FIGURES = {
    "calibration": lambda path: save_calibration_figure(path, *_calibration_args()),
    "histogram": lambda path: save_r_histogram(path, R),
    "scatter": lambda path: save_r_scatter(path, R["is"], R["els"], "els"),
    "provenance": lambda path: save_provenance_figure(path, *_provenance_args()[0], **_provenance_args()[1]),
    "departure": lambda path: save_departure_figure(path, **_departure_panels(1)[0]),
    "worst-seeds": lambda path: save_worst_seeds_figure(
        path, _departure_panels(), [(0, [0.1, 0.2, None, 0.3, 0.4]), (7, [0.2] * 5)], [0.15, 0.2, 0.2, 0.25, 0.3]
    ),
}


@pytest.mark.parametrize("figure", sorted(FIGURES))
def test_png_svg_pdf_by_extension(figure, tmp_path):
    draw = FIGURES[figure]
    png = draw(tmp_path / "f.png")
    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and im.width > 300 and im.height > 300
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # something was drawn
    svg = draw(tmp_path / "f.SVG")  # the extension is case-insensitive
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    pdf = draw(tmp_path / "f.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    # the same data give the same bytes (no time stamps), and elsfast may replace its own file
    assert draw(tmp_path / "f.pdf").read_bytes() == pdf
    with pytest.raises(ValueError, match=r"\.png, \.svg, \.pdf"):
        draw(tmp_path / "f.jpg")
    assert not (tmp_path / "f.jpg").exists()


@pytest.mark.parametrize("figure", sorted(FIGURES))
def test_refuses_a_foreign_file(figure, tmp_path):
    path = tmp_path / "mine.png"
    path.write_bytes(FOREIGN)
    with pytest.raises(FileExistsError, match="not written by elsfast"):
        FIGURES[figure](path)
    assert path.read_bytes() == FOREIGN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]  # no temporary file left


def test_calibration_plot_from_saved_json(tmp_path):
    sizes, cosine, best, _ = _calibration_args()
    res = CalibrationResult(steps=6, sizes=sizes, seeds=[0, 1, 2, 3], labels=[None] * 4, best=best, cosine=cosine)
    back = CalibrationResult.from_json(res.to_json(tmp_path / "c.json"))
    assert back.plot(tmp_path / "c.png").read_bytes() == res.plot(tmp_path / "d.png").read_bytes()


@pytest.mark.parametrize("figure", sorted(FIGURES))
def test_figures_are_not_left_in_pyplot(figure, tmp_path):
    """Each figure is a `Figure` of its own, never one of pyplot's: with pyplot imported, drawing leaves no figure
    open there (a loop over many figures would keep them all) and switches no backend."""
    import matplotlib
    import matplotlib.pyplot as plt

    before, backend = plt.get_fignums(), matplotlib.get_backend()
    FIGURES[figure](tmp_path / "f.png")
    assert plt.get_fignums() == before
    assert matplotlib.get_backend() == backend


def test_import_elsfast_does_not_import_matplotlib():
    code = "import sys, elsfast, elsfast.research.compare, elsfast.research.explain, elsfast.plots; "
    code += "print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------------------ without matplotlib


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


@pytest.mark.parametrize("figure", sorted(FIGURES))
def test_figure_without_matplotlib_says_how_to_install(figure, tmp_path, no_matplotlib):
    with pytest.raises(ImportError, match=r"pip install elsfast\[plots\]"):
        FIGURES[figure](tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_numbers_without_matplotlib(tmp_path, no_matplotlib):
    from elsfast.machine import ScoreMachine
    from elsfast.plots import matplotlib_missing
    from elsfast.research.calibrate import calibrate
    from elsfast.research.compare import compare
    from elsfast.research.explain import explain

    assert "pip install elsfast[plots]" in matplotlib_missing()
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    m = ScoreMachine(images, machine="els", padding="zeros")

    def network(x, abar, labels):
        return m.eps(x, abar, 3, labels)

    res = calibrate(network, m, sizes=(1, 3), seeds=[0, 1], steps=3, progress=False)
    assert res.scales[1:] == [3, 3]
    with pytest.raises(ImportError, match=r"pip install elsfast\[plots\]"):
        res.plot(tmp_path / "cal.png")

    with pytest.warns(UserWarning, match=r"hist.png and scatter.png skipped.*pip install elsfast\[plots\]"):
        report = compare(network, images, out_dir=tmp_path / "cmp", seeds=range(2), steps=3, progress=False)
    assert report["summary"]["els"]["median_r"] == pytest.approx(1.0, abs=1e-4)
    assert "pip install elsfast[plots]" in report["figures_skipped"]
    assert "hist" not in report["files"] and "grid" in report["files"]  # the grid is an image, not a plot
    assert not (tmp_path / "cmp" / "hist.png").exists()
    assert "were not drawn" in (tmp_path / "cmp" / "summary.md").read_text()

    with pytest.warns(UserWarning, match="figures skipped"):
        measures = explain(m, 1, steps=3, out_dir=tmp_path / "why", progress=False)
    assert measures[0]["figure"] is None
    assert json.loads((tmp_path / "why" / "measures.json").read_text()) == measures
    assert not (tmp_path / "why" / "sample_0.png").exists()


def test_compare_figures_redrawn_from_results(tmp_path):
    from elsfast.machine import ScoreMachine
    from elsfast.research.compare import compare, plot_results

    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    m = ScoreMachine(images, machine="els", padding="zeros")
    report = compare(
        lambda x, abar, y: m.eps(x, abar, 3, y), images, out_dir=tmp_path, seeds=range(2), steps=3, progress=False
    )
    assert report["figures_skipped"] is None
    before = (tmp_path / "hist.png").read_bytes()
    files = plot_results(tmp_path)
    assert sorted(files) == ["hist", "scatter"] and (tmp_path / "hist.png").read_bytes() == before
    with pytest.raises(ValueError, match="no rows for seeds"):
        plot_results(tmp_path, seeds=[7])
