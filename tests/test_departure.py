"""Where a network leaves the ELS mosaic (`elsfast.research.departure`, paper Figs. 23/24): the re-run ELS
trajectory reproduces the comparison's image bit for bit and its provenance is the image's; the boundary/interior
measure on hand-built mosaics; an ELS machine posing as the network departs nowhere; figures, foreign files,
resuming, the CLI and the `reproduce` hook."""

import json

import pytest
import torch
from PIL import Image

import elsfast
from elsfast.cli import main
from elsfast.common.provenance import Provenance
from elsfast.machine import ScoreMachine
from elsfast.research import departure as dep
from elsfast.research.calibrate import seed_noise
from elsfast.research.compare import compare

STEPS = 5
SCALES = [3, 3, 5, 5, 7]
FOREIGN = b"a user's own notes"


@pytest.fixture(scope="module")
def train():
    g = torch.Generator().manual_seed(7)
    images = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(6) % 2
    return images, labels


def _ls_network(images, labels):
    """A network that is not the ELS machine: the LS machine at P = 5 (its eps)."""
    m = ScoreMachine(images, labels, machine="ls", padding="zeros")
    return lambda x, abar, y: m.eps(x, abar, 5, y)


def _compare(out, images, labels, network=None, seeds=range(3), **kw):
    network = network or _ls_network(images, labels)
    options = dict(scales=SCALES, seeds=seeds, steps=STEPS, machines=("els", "is"), progress=False, network="t")
    return compare(network, images, labels, out_dir=out, **{**options, **kw})


# ----------------------------------------------------------------------------------------------- the re-run


@pytest.mark.parametrize("grid", ["machine", "network"])
def test_rerun_reproduces_the_stored_els_image_bit_for_bit(train, tmp_path, grid):
    images, labels = train
    report = _compare(tmp_path, images, labels, grid=grid)
    config = report["config"]
    m = ScoreMachine(images, labels, machine="els", padding="zeros")
    for row in report["rows"]:
        stored = torch.load(tmp_path / "samples" / f"seed_{row['seed']:05d}.pt", weights_only=True)
        image, prov = dep.rerun_machine(m, config, row["seed"], row["label"])
        assert torch.equal(image, stored["els"]), row["seed"]
        # the provenance is the image's: where one entry dominates, the pixel is that training pixel ...
        sure = prov.weight > 0.999
        assert sure.sum() >= 8
        source = images[prov.source_image, :, prov.source_y, prov.source_x].permute(2, 0, 1)  # [C, H, W]
        assert torch.allclose(image[:, sure], source[:, sure], atol=2e-3)
        if grid == "machine":  # ... and the one elsfast.sample(..., return_provenance=True) gives
            noise = seed_noise([row["seed"]], images.shape[1:])
            kw = dict(steps=STEPS, patch_size=SCALES, labels=[row["label"]], noise=noise, progress=False)
            assert torch.equal(elsfast.sample(m, 1, **kw)[0], image)
            # (with provenance at every step some backends round differently: the trajectory moves by ~1e-5)
            sampled, trace = elsfast.sample(m, 1, **kw, return_provenance=True)
            assert torch.allclose(sampled[0], image, atol=1e-4)
            for name in ("source_image", "source_y", "source_x"):
                assert torch.equal(getattr(trace.provenance, name)[0], getattr(prov, name)), name
            assert torch.allclose(trace.provenance.weight[0], prov.weight, atol=1e-3)
    out = dep.departure(tmp_path, images, labels, progress=False, tolerance=0.0)
    assert all(r["reproduced"] == {"max_abs_diff": 0.0, "bitwise": True} for r in out["rows"])


def test_a_stored_image_the_rerun_does_not_reproduce_is_refused(train, tmp_path):
    images, labels = train
    _compare(tmp_path, images, labels, seeds=[0, 1])
    path = tmp_path / "samples" / "seed_00001.pt"
    stored = torch.load(path, weights_only=True)
    stored["els"][0, 2, 3] += 1e-3
    torch.save(stored, path)
    with pytest.raises(ValueError, match=r"seed 1: the re-run ELS image differs from the stored one by up to 0.001"):
        dep.departure(tmp_path, images, labels, progress=False)
    out = dep.departure(tmp_path, images, labels, progress=False, tolerance=2e-3)
    row = out["rows"][1]
    assert row["reproduced"]["bitwise"] is False and row["reproduced"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert out["rows"][0]["reproduced"]["bitwise"] is True


def test_another_training_set_or_missing_labels_are_refused(train, tmp_path):
    images, labels = train
    _compare(tmp_path, images, labels, seeds=[0])
    with pytest.raises(ValueError, match="not the training set of the comparison"):
        dep.departure(tmp_path, images.flip(0), labels, progress=False)
    with pytest.raises(ValueError, match="class-conditional: pass train_labels"):
        dep.departure(tmp_path, images, None, progress=False)
    with pytest.raises(ValueError, match="machine 'ls' was not compared"):
        dep.departure(tmp_path, images, labels, machine="ls", progress=False)
    with pytest.raises(ValueError, match=r"not there: \[5\]"):
        dep.departure(tmp_path, images, labels, seeds=[0, 5], progress=False)
    assert not (tmp_path / "departure" / "departure.json").exists()


def test_els_posing_as_the_network_departs_nowhere(train, tmp_path):
    images, labels = train
    m = ScoreMachine(images, labels, machine="els", padding="zeros")
    report = _compare(tmp_path, images, labels, network=lambda x, abar, y: m.eps(x, abar, 3, y), scales=3)
    assert all(row["r"]["els"] > 0.9999 for row in report["rows"])
    out = dep.departure(tmp_path, images, labels, progress=False)
    for row in out["rows"]:
        assert row["mean_departure"] < 1e-4
        for by in dep.BOUNDARIES:
            assert row[by]["boundary_mean"] < 1e-4 and row[by]["interior_mean"] < 1e-4
        data = torch.load(tmp_path / "departure" / f"seed_{row['seed']:05d}.pt", weights_only=True)
        assert data["departure"].shape == (8, 8) and float(data["departure"].max()) < 1e-4


# ------------------------------------------------------------------------------------------- the measure


def _mosaic() -> Provenance:
    """4 x 6: columns 0-2 from training image 0, 3-5 from image 1, each a straight copy (source = pixel), except
    that rows 2-3 of image 0's half come from two rows further down (a seam inside image 0)."""
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    image = (xs >= 3).long()
    sy = torch.where((xs < 3) & (ys >= 2), ys + 2, ys)
    return Provenance(image, sy, xs.clone(), torch.ones(4, 6), torch.zeros(4, 6))


def test_boundaries_between_images_and_at_seams():
    prov = _mosaic()
    image = dep.mosaic_boundaries(prov, by="image")
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[:, 2:4] = True
    assert torch.equal(image, expected)
    patch = dep.mosaic_boundaries(prov, by="patch")
    expected[1:3, 0:3] = True  # the seam between rows 1 and 2 of image 0's half
    assert torch.equal(patch, expected)
    # batched like the provenance of a sample() call
    batch = Provenance(*(torch.stack([getattr(prov, f)] * 2) for f in ("source_image", "source_y", "source_x",
                                                                          "weight", "entropy")))  # fmt: skip
    assert torch.equal(dep.mosaic_boundaries(batch, by="patch"), torch.stack([patch, patch]))
    with pytest.raises(ValueError, match="by must be one of image, patch"):
        dep.mosaic_boundaries(prov, by="pixel")
    # graded: how many of the 4-neighbours are inconsistent
    count = dep.inconsistent_neighbours(prov, by="patch")
    expected = torch.tensor([[0, 0, 1, 1, 0, 0], [1, 1, 2, 1, 0, 0], [1, 1, 2, 1, 0, 0], [0, 0, 1, 1, 0, 0]])
    assert torch.equal(count, expected)
    profile = dep.neighbour_profile(0.1 + 0.1 * count.double(), count)
    assert profile["pixels"] == [12, 10, 2, 0, 0] and profile["mean"][3:] == [None, None]
    assert profile["mean"][:3] == [pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.3)]
    assert profile["pearson"] == pytest.approx(1.0)
    assert dep.neighbour_profile(torch.ones(4, 6), count)["pearson"] is None  # a constant departure: no correlation


def test_a_copy_that_wraps_round_is_consistent_only_with_wrap():
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    prov = Provenance(torch.zeros(3, 5, dtype=torch.long), ys.clone(), (xs + 2) % 5, torch.ones(3, 5),
                      torch.zeros(3, 5))  # fmt: skip
    assert not dep.mosaic_boundaries(prov, by="patch", wrap=True).any()
    seam = dep.mosaic_boundaries(prov, by="patch", wrap=False)
    assert seam[:, 2:4].all() and not seam[:, [0, 1, 4]].any()
    assert not dep.mosaic_boundaries(prov, by="image").any()


def test_departure_only_at_boundaries_gives_the_expected_ratio():
    prov = _mosaic()
    boundary = dep.mosaic_boundaries(prov, by="image")
    departure = torch.where(boundary, 0.3, 0.1).double()
    c = dep.boundary_contrast(departure, boundary)
    assert c["boundary_mean"] == pytest.approx(0.3) and c["interior_mean"] == pytest.approx(0.1)
    assert c["ratio"] == pytest.approx(3.0)
    assert (c["boundary_pixels"], c["interior_pixels"], c["boundary_fraction"]) == (8, 16, pytest.approx(1 / 3))
    only = dep.boundary_contrast(torch.where(boundary, 0.5, 0.0).double(), boundary)
    assert only["interior_mean"] == 0.0 and only["ratio"] is None  # no departure inside: no finite ratio
    none = dep.boundary_contrast(departure, torch.zeros(4, 6, dtype=torch.bool))
    assert none["boundary_mean"] is None and none["ratio"] is None and none["interior_mean"] == pytest.approx(1 / 6)

    # the departure map: |network - machine| averaged over channels
    network, machine = torch.zeros(3, 4, 6), torch.zeros(3, 4, 6)
    network[0] = 0.6  # one channel of three departs by 0.6: the map says 0.2
    assert torch.allclose(dep.departure_map(network, machine), torch.full((4, 6), 0.2, dtype=torch.float64))

    count = dep.inconsistent_neighbours(prov, by="image")
    c["neighbours"] = dep.neighbour_profile(departure, count)
    only["neighbours"] = dep.neighbour_profile(torch.where(boundary, 0.5, 0.0).double(), count)
    rows = [
        {"mean_departure": 0.2, "pearson_entropy": 0.5, "image": c, "patch": c},
        {"mean_departure": 0.4, "pearson_entropy": None, "image": only, "patch": only},
    ]
    s = dep.summarize_departure(rows)
    assert s["image"]["pooled_mean_by_neighbours"] == [pytest.approx(0.05), pytest.approx(0.4), None, None, None]
    assert s["image"]["median_pearson_neighbours"] == pytest.approx(1.0)
    assert s["median_pearson_entropy"] == 0.5
    assert s["image"]["seeds"] == 1 and s["image"]["median_ratio"] == pytest.approx(3.0)
    assert s["image"]["above_one"] == 1.0
    assert s["image"]["pooled_boundary_mean"] == pytest.approx((0.3 * 8 + 0.5 * 8) / 16)
    assert s["image"]["pooled_interior_mean"] == pytest.approx(0.1 * 16 / 32)
    assert s["image"]["pooled_ratio"] == pytest.approx(0.4 / 0.05)
    assert s["median_mean_departure"] == pytest.approx(0.3)


# ------------------------------------------------------------------------------------- the directory


def test_figures_are_written(train, tmp_path):
    pytest.importorskip("matplotlib", reason="the departure figures need matplotlib (elsfast[plots])")
    images, labels = train
    report = _compare(tmp_path, images, labels)
    out = dep.departure(tmp_path, images, labels, worst=1, progress=False)
    assert out["figures_skipped"] is None
    by_r = sorted(report["rows"], key=lambda row: row["r"]["els"])
    assert out["worst"] == [by_r[0]["seed"]]
    for s in range(3):
        with Image.open(tmp_path / "departure" / f"seed_{s:05d}.png") as im:
            assert im.format == "PNG" and im.width > 4 * 100
    with Image.open(tmp_path / "departure" / "worst.png") as im:
        one = im.height
    dep.departure(tmp_path, images, labels, worst=3, progress=False)
    with Image.open(tmp_path / "departure" / "worst.png") as im:
        assert im.height > 2 * one  # one row per seed shown
    saved = dep.load_departure(tmp_path / "departure")
    assert saved["worst"] == [row["seed"] for row in by_r] and saved["files"]["worst"].endswith("worst.png")


def test_without_matplotlib_the_numbers_are_written(train, tmp_path, monkeypatch):
    import sys

    images, labels = train
    _compare(tmp_path, images, labels, seeds=[0])
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match=r"figures were skipped.*pip install elsfast\[plots\]"):
        out = dep.departure(tmp_path, images, labels, progress=False)
    assert "pip install elsfast[plots]" in out["figures_skipped"]
    assert dep.load_departure(tmp_path / "departure")["rows"][0]["seed"] == 0
    assert not (tmp_path / "departure" / "seed_00000.png").exists()


@pytest.mark.parametrize("name", ["departure.json", "seed_00001.png", "seed_00001.pt", "worst.png"])
def test_files_elsfast_did_not_write_are_never_replaced(train, tmp_path, name):
    images, labels = train
    _compare(tmp_path, images, labels, seeds=[0, 1])
    folder = tmp_path / "departure"
    folder.mkdir()
    (folder / name).write_bytes(FOREIGN)
    with pytest.raises(FileExistsError, match="not written by elsfast"):
        dep.departure(tmp_path, images, labels, progress=False)
    assert (folder / name).read_bytes() == FOREIGN
    assert sorted(p.name for p in folder.iterdir()) == [name]  # refused before any work


def test_resume_computes_only_what_is_missing(train, tmp_path, monkeypatch):
    images, labels = train
    _compare(tmp_path, images, labels)
    first = dep.departure(tmp_path, images, labels, seeds=[0], progress=False)
    assert first["computed"] == 1 and first["seeds"] == [0]

    calls = []
    rerun = dep.rerun_machine

    def crashing(*args, **kwargs):  # a crash during the second seed computed now
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return rerun(*args, **kwargs)

    monkeypatch.setattr(dep, "rerun_machine", crashing)
    with pytest.raises(KeyboardInterrupt):
        dep.departure(tmp_path, images, labels, progress=False)
    assert calls == [1, 2]
    assert [row["seed"] for row in dep.load_departure(tmp_path / "departure")["rows"]] == [0, 1]
    monkeypatch.setattr(dep, "rerun_machine", rerun)

    kept = (tmp_path / "departure" / "seed_00000.pt").stat().st_mtime_ns
    done = dep.departure(tmp_path, images, labels, progress=False)
    assert done["computed"] == 1 and done["seeds"] == [0, 1, 2]
    assert (tmp_path / "departure" / "seed_00000.pt").stat().st_mtime_ns == kept
    again = dep.departure(tmp_path, images, labels, progress=False)
    assert again["computed"] == 0 and again["rows"] == done["rows"] and again["summary"] == done["summary"]

    # a seed whose comparison images changed is computed again; its data file went missing: the same
    torch.save(torch.load(tmp_path / "samples" / "seed_00002.pt", weights_only=True) | {"note": torch.zeros(1)},
               tmp_path / "samples" / "seed_00002.pt")  # fmt: skip
    (tmp_path / "departure" / "seed_00001.pt").unlink()
    assert dep.departure(tmp_path, images, labels, progress=False)["computed"] == 2

    with pytest.raises(ValueError, match="another machine"):
        dep.departure(tmp_path, images, labels, machine="is", progress=False)


# ------------------------------------------------------------------------------------------ CLI and reproduce


def test_cli_departure(tmp_path, capsys):
    from elsfast import datasets

    data = datasets.load("mnist-embedded", limit=12)
    m = ScoreMachine(data.images, machine="ls", padding="zeros")
    compare(lambda x, abar, y: m.eps(x, abar, 5, y), data.images, out_dir=tmp_path, scales=3, seeds=range(3),
            steps=4, machines=("els",), progress=False, network="ls5")  # fmt: skip
    assert main(["departure", str(tmp_path), "--quiet"]) == 2
    assert "names no network checkpoint on disk: pass --checkpoint" in capsys.readouterr().err
    assert main(["departure", str(tmp_path), "--dataset", "mnist-embedded", "--limit", "13", "--quiet"]) == 2
    assert "not the training set of the comparison" in capsys.readouterr().err
    argv = ["departure", str(tmp_path), "--dataset", "mnist-embedded", "--limit", "12", "--seeds", "2", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 seeds (2 computed now); the re-run ELS images equal the stored ones bit for bit on 2" in out
    assert "boundaries between training images: mean |network - ELS|" in out
    assert json.loads((tmp_path / "departure" / "departure.json").read_text())["seeds"] == [0, 1]


def test_reproduce_runs_departure_for_a_preset_that_asks(tmp_path, capsys):
    from elsfast.nets.train import TrainConfig
    from elsfast.research.reproduce import PRESETS, Preset, reproduce

    assert PRESETS["cifar10-sa-small"].departure and PRESETS["cifar10-unet-sa-zeros"].departure
    assert not PRESETS["cifar10-small"].departure
    tiny = Preset(
        train=TrainConfig(
            dataset="mnist-embedded",
            limit=20,
            arch="resnet",
            channels=8,
            blocks=1,
            conditional=True,
            batch_size=8,
            max_steps=2,
            checkpoint_every=100000,
        ),
        sizes=(1, 3),
        calibration_seeds=1,
        comparison_seeds=2,
        steps=3,
        machines=("els",),
        scales=(3, 3, 3),
        departure=True,
    )
    summary = reproduce(tiny, tmp_path, progress=False)
    saved = dep.load_departure(tmp_path / "report" / "departure")
    assert saved["seeds"] == [1000, 1001] and summary["files"]["departure"].endswith("departure.json")
    assert all(row["reproduced"]["bitwise"] for row in saved["rows"])
    # the command line finds the network checkpoint the comparison names, and its training set
    assert main(["departure", str(tmp_path / "report"), "--quiet"]) == 0
    assert "2 seeds (0 computed now)" in capsys.readouterr().out
