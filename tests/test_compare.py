"""Network-vs-machine comparison (SPEC section 3): a "network" that is an ELS machine must agree with the ELS
machine (r ~ 1) and beat IS; the report directory is complete; an interrupted run resumes without recomputing."""

import json
import math

import pytest
import torch
from PIL import Image

from elsfast.common.schedules import get_schedule
from elsfast.machine import ScoreMachine
from elsfast.research.compare import compare, load_results

STEPS = 6


@pytest.fixture(scope="module")
def train():
    g = torch.Generator().manual_seed(1)
    images = torch.rand(10, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(10) % 2
    return images, labels


class ElsNetwork:
    """eps_fn of an ELS machine with patch size `size`, counting its calls and recording the labels it gets."""

    def __init__(self, images, labels=None, size=3, fail_after=None):
        self.m = ScoreMachine(images, labels, machine="els", padding="zeros")
        self.size, self.calls, self.labels, self.fail_after = size, 0, [], fail_after

    def __call__(self, x, abar, labels):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.labels.append(None if labels is None else labels.tolist())
        return self.m.eps(x, abar, self.size, labels)


def test_els_network_matches_els_and_beats_is(train, tmp_path):
    images, _ = train
    net = ElsNetwork(images)
    report = compare(
        net, images, out_dir=tmp_path, scales=3, seeds=range(4), steps=STEPS, progress=False, network="els3"
    )
    assert net.calls == 4 * (STEPS - 1) and report["computed"] == 4
    assert [row["seed"] for row in report["rows"]] == [0, 1, 2, 3]
    for row in report["rows"]:
        assert row["label"] is None
        assert row["r"]["els"] == pytest.approx(1.0, abs=1e-4)
        assert row["r2"]["els"] == pytest.approx(1.0, abs=1e-4)
        assert row["r"]["els"] > row["r"]["is"]
        assert row["r2"]["is"] <= row["r"]["is"] ** 2 + 1e-9 or math.isnan(row["r2"]["is"])  # R^2 <= r^2 always
    s = report["summary"]
    assert s["els"]["beats_is"] == 1.0 and s["els"]["beats_is_count"] == 4
    assert s["els"]["median_r"] == pytest.approx(1.0, abs=1e-4)
    assert "beats_is" not in s["is"] and 0 <= s["ls"]["beats_is"] <= 1

    summary = (tmp_path / "summary.md").read_text()
    assert "| machine | median Pearson r | median R^2 | beats IS (fraction of seeds) |" in summary
    assert "| ELS | 1.000 | 1.000 | 1.00 (4/4) |" in summary
    assert "| LS |" in summary and "| IS |" in summary
    for name in ("grid.png", "hist.png", "scatter.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 100
    with Image.open(tmp_path / "grid.png") as im:  # 4 columns (network, ELS, LS, IS) of 8 x 8 images upscaled 8x
        assert im.width == 4 * (64 + 4) + 4
    data = load_results(tmp_path)
    assert data["config"]["scales"] == [3] * STEPS and len(data["rows"]) == 4
    saved = torch.load(tmp_path / "samples" / "seed_00002.pt", weights_only=True)
    assert sorted(saved) == ["els", "is", "ls", "network"] and saved["network"].shape == (1, 8, 8)


def test_resume_recomputes_nothing(train, tmp_path):
    images, _ = train
    kw = dict(scales=[1, 3, 3, 5, 5, 5], steps=STEPS, machines=("els", "is"), progress=False, network="els3")
    full = compare(ElsNetwork(images), images, out_dir=tmp_path / "full", seeds=range(3), **kw)

    # a crash in the middle of seed 1 (the network makes STEPS - 1 calls per seed)
    crashing = ElsNetwork(images, fail_after=STEPS - 1 + 2)
    with pytest.raises(KeyboardInterrupt):
        compare(crashing, images, out_dir=tmp_path / "run", seeds=range(3), **kw)
    assert [row["seed"] for row in load_results(tmp_path / "run")["rows"]] == [0]
    assert not list((tmp_path / "run").glob("**/*.tmp"))

    net = ElsNetwork(images)
    resumed = compare(net, images, out_dir=tmp_path / "run", seeds=range(3), **kw)
    assert net.calls == 2 * (STEPS - 1) and resumed["computed"] == 2
    assert resumed["rows"] == full["rows"] and resumed["summary"] == full["summary"]

    net = ElsNetwork(images)
    again = compare(net, images, out_dir=tmp_path / "run", seeds=range(3), **kw)
    assert net.calls == 0 and again["computed"] == 0 and again["rows"] == full["rows"]

    # more seeds: only the new one runs; fewer seeds: the report covers them, the file keeps every row
    net = ElsNetwork(images)
    more = compare(net, images, out_dir=tmp_path / "run", seeds=range(4), **kw)
    assert net.calls == STEPS - 1 and more["rows"][:3] == full["rows"]
    fewer = compare(ElsNetwork(images), images, out_dir=tmp_path / "run", seeds=[2], **kw)
    assert fewer["rows"] == [full["rows"][2]] and len(load_results(tmp_path / "run")["rows"]) == 4


def test_resume_with_another_configuration_raises(train, tmp_path):
    images, _ = train
    kw = dict(seeds=[0], machines=("is",), progress=False, network="a")
    compare(ElsNetwork(images), images, out_dir=tmp_path, steps=3, **kw)
    with pytest.raises(ValueError, match="steps"):
        compare(ElsNetwork(images), images, out_dir=tmp_path, steps=4, **kw)
    with pytest.raises(ValueError, match="network"):
        compare(ElsNetwork(images), images, out_dir=tmp_path, steps=3, **{**kw, "network": "b"})
    with pytest.raises(ValueError, match="train_sha256"):
        compare(ElsNetwork(images), images.flip(0), out_dir=tmp_path, steps=3, **kw)
    assert json.loads((tmp_path / "results.json").read_text())["config"]["steps"] == 3


def test_conditional_labels_and_network_steps(train, tmp_path):
    images, labels = train
    net = ElsNetwork(images, labels)
    report = compare(
        net,
        images,
        labels,
        (1, 8, 8),
        out_dir=tmp_path,
        seeds=[0, 1, 2],
        steps=3,
        network_steps=5,
        machines=("els", "is"),
        progress=False,
    )
    assert [row["label"] for row in report["rows"]] == [0, 1, 0]
    assert net.labels == [[0]] * 4 + [[1]] * 4 + [[0]] * 4  # network_steps - 1 calls per seed, with its label
    assert report["config"]["network_steps"] == 5 and report["config"]["conditional"]
    with pytest.raises(ValueError, match="label"):
        compare(
            ElsNetwork(images, labels),
            images,
            labels,
            out_dir=tmp_path,
            seeds=[0],
            labels=[1],
            steps=3,
            network_steps=5,
            machines=("els", "is"),
            progress=False,
        )


def test_module_network_gets_a_weight_hash(train, tmp_path):
    images, _ = train

    class StandIn(torch.nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(float(w)))

        def forward(self, x, t, labels=None):
            return self.w * x

    kw = dict(seeds=[0], steps=3, machines=("ls", "is"), progress=False)
    report = compare(StandIn(0.5), images, out_dir=tmp_path, **kw)
    assert report["config"]["network"].startswith("module-sha256:")
    assert compare(StandIn(0.5), images, out_dir=tmp_path, **kw)["computed"] == 0
    with pytest.raises(ValueError, match="network"):
        compare(StandIn(0.25), images, out_dir=tmp_path, **kw)


def test_network_grid_starts_everyone_at_t_one(train, tmp_path):
    """grid="network" (the authors' network sampler): the network and every machine make `steps` updates from the
    same noise placed at t = 1; an ELS "network" still equals the ELS machine, and the report says which grid."""
    images, _ = train
    net = ElsNetwork(images)
    kw = dict(scales=3, seeds=range(2), steps=STEPS, progress=False, network="els3", machines=("els", "is"))
    report = compare(net, images, out_dir=tmp_path / "net", grid="network", **kw)
    assert net.calls == 2 * STEPS  # one more evaluation per seed than the machine grid's STEPS - 1
    for row in report["rows"]:
        assert row["r"]["els"] == pytest.approx(1.0, abs=1e-4)
    assert report["config"]["grid"] == "network"
    assert "step grid `network` (noise placed at t = 1" in (tmp_path / "net" / "summary.md").read_text()
    machine_grid = compare(ElsNetwork(images), images, out_dir=tmp_path / "machine", **kw)
    assert "step grid `machine`" in (tmp_path / "machine" / "summary.md").read_text()
    a = torch.load(tmp_path / "net" / "samples" / "seed_00000.pt", weights_only=True)["els"]
    b = torch.load(tmp_path / "machine" / "samples" / "seed_00000.pt", weights_only=True)["els"]
    assert not torch.equal(a, b)  # the grids differ: one more update from t = 1
    assert machine_grid["config"]["grid"] == "machine"
    with pytest.raises(ValueError, match="grid"):  # resuming with the other grid is another configuration
        compare(ElsNetwork(images), images, out_dir=tmp_path / "machine", grid="network", **kw)
    with pytest.raises(ValueError, match="unknown step grid"):
        compare(ElsNetwork(images), images, out_dir=tmp_path / "x", grid="t1", **kw)


def test_results_written_before_the_grid_option_resume(train, tmp_path):
    images, _ = train
    kw = dict(scales=3, seeds=range(1), steps=STEPS, progress=False, network="els3", machines=("els",))
    compare(ElsNetwork(images), images, out_dir=tmp_path, **kw)
    path = tmp_path / "results.json"
    data = json.loads(path.read_text())
    del data["config"]["grid"]
    path.write_text(json.dumps(data))
    assert compare(ElsNetwork(images), images, out_dir=tmp_path, **kw)["computed"] == 0


# ---------------------------------------------------------------------------------------------- issue 28, item 2


class AbarNetwork(ElsNetwork):
    """An ELS "network" that records the abar of every call."""

    def __init__(self, images, labels=None):
        super().__init__(images, labels)
        self.abars = []

    def __call__(self, x, abar, labels):
        self.abars.append(abar)
        return super().__call__(x, abar, labels)


@pytest.mark.parametrize("grid", ["machine", "network"])
def test_more_network_steps_start_at_the_machines_first_t(train, tmp_path, grid):
    """network_steps != steps: the network runs from the same noise at the machines' first t (3/4 for 4 machine
    steps on the machine grid, 1 on the network grid) down to 0 in equal steps; results.json records its first t."""
    from elsfast.common.schedules import abar_cosine_legacy

    images, _ = train
    net = AbarNetwork(images)
    kw = dict(seeds=[0], steps=4, network_steps=9, machines=("els",), progress=False, network="els3", grid=grid)
    report = compare(net, images, out_dir=tmp_path, **kw)
    first, updates = (3 / 4, 8) if grid == "machine" else (1.0, 9)
    assert net.abars == [abar_cosine_legacy(first * j / updates) for j in range(updates, 0, -1)]
    assert net.abars[0] == abar_cosine_legacy(first)  # the machines' first abar (theirs: 3 or 4 updates of 1/4)
    assert report["config"]["network_start_t"] == first and report["config"]["protocol"] is None
    summary = (tmp_path / "summary.md").read_text()
    assert f"network: 9 steps from t = {first:g}, where the machines start" in summary
    assert "none of the paper's protocols" in summary


class LinearNetwork:
    """A cheap eps_fn, eps = x / 2, recording the abar of every call."""

    def __init__(self):
        self.abars = []

    def __call__(self, x, abar, labels):
        self.abars.append(abar)
        return 0.5 * x


def test_both_protocols_end_to_end(train, tmp_path):
    """protocol="table1": the network makes 149 updates from t = 19/20, the machines 19; "table2": both 19; the
    protocol, the network's steps and its first t are in results.json and summary.md; the same step counts
    given without a name are recorded as that protocol, and a resumed run with the other protocol is refused."""
    images, _ = train
    kw = dict(seeds=[0], machines=("is",), progress=False, network="half")
    for name, calls in (("table1", 149), ("table2", 19)):
        net = LinearNetwork()
        report = compare(net, images, out_dir=tmp_path / name, protocol=name, **kw)
        config = report["config"]
        assert len(net.abars) == calls and net.abars[0] == get_schedule("cosine-legacy")(19 / 20)
        assert (config["protocol"], config["steps"], config["network_start_t"]) == (name, 20, 0.95)
        assert config["network_steps"] == {"table1": 150, "table2": 20}[name]
        saved = json.loads((tmp_path / name / "results.json").read_text())["config"]
        assert saved["protocol"] == name and saved["network_start_t"] == 0.95
        summary = (tmp_path / name / "summary.md").read_text()
        assert f"protocol `{name}` (the paper's Table {name[-1]}" in summary
        assert f"network: {config['network_steps']} steps from t = 0.95" in summary
    unnamed = compare(LinearNetwork(), images, out_dir=tmp_path / "table1", network_steps=150, **kw)
    assert unnamed["computed"] == 0 and unnamed["config"]["protocol"] == "table1"
    with pytest.raises(ValueError, match="network_steps: saved 150, now 20"):
        compare(LinearNetwork(), images, out_dir=tmp_path / "table1", protocol="table2", **kw)


def test_contradictory_protocols_are_refused(train, tmp_path):
    from elsfast.research.protocols import protocol_steps

    images, _ = train
    kw = dict(out_dir=tmp_path, seeds=[0], machines=("is",), progress=False)
    with pytest.raises(ValueError, match="protocol 'table1' runs the machines for 20 steps and the network for 150"):
        compare(ElsNetwork(images), images, protocol="table1", network_steps=20, **kw)
    with pytest.raises(ValueError, match=r"protocol 'table2'.*steps=10 was given"):
        compare(ElsNetwork(images), images, protocol="table2", steps=10, **kw)
    with pytest.raises(ValueError, match="unknown protocol 'table3'; known: table1, table2"):
        compare(ElsNetwork(images), images, protocol="table3", **kw)
    assert protocol_steps("table1", 20, 150) == (20, 150) and protocol_steps(None, 7, None) == (7, 7)
    assert not (tmp_path / "results.json").exists()  # refused before anything ran


@pytest.mark.parametrize("network_steps", [STEPS, 9])
def test_results_written_before_the_protocols_resume_as_what_they_were(train, tmp_path, network_steps):
    """A results.json without `protocol` and `network_start_t` (written before them) resumes when its network
    started where it starts now (network_steps = steps), and is refused when it started on its own grid at
    (n-1)/n rather than at the machines' first t."""
    images, _ = train
    kw = dict(seeds=range(1), steps=STEPS, network_steps=network_steps, progress=False, network="els3")
    compare(ElsNetwork(images), images, out_dir=tmp_path, machines=("els",), **kw)
    path = tmp_path / "results.json"
    data = json.loads(path.read_text())
    for key in ("protocol", "network_start_t", "grid"):
        del data["config"][key]
    path.write_text(json.dumps(data))
    if network_steps == STEPS:
        again = compare(ElsNetwork(images), images, out_dir=tmp_path, machines=("els",), **kw)
        assert again["computed"] == 0 and again["config"]["network_start_t"] == (STEPS - 1) / STEPS
    else:
        with pytest.raises(ValueError, match=r"network_start_t: saved 0.888.*now 0.833"):
            compare(ElsNetwork(images), images, out_dir=tmp_path, machines=("els",), **kw)
