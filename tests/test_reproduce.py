"""The reproduction pipeline end to end on a tiny preset, and its resumability."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from elsfast.nets.train import TrainConfig
from elsfast.research.reproduce import PRESETS, Preset, reproduce

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    return Preset(
        train=TrainConfig(
            dataset="mnist-embedded",
            limit=40,
            arch="resnet",
            channels=8,
            blocks=1,
            conditional=True,
            batch_size=8,
            max_steps=3,
            checkpoint_every=2,
        ),
        sizes=(1, 3),
        calibration_seeds=2,
        comparison_seeds=2,
        steps=4,
    )


def test_reproduce_runs_all_stages_and_resumes(tiny, tmp_path):
    summary = reproduce(tiny, tmp_path, progress=False)
    for name in ("network.pt", "calibration.json", "calibration.png", "reproduction.json", "report/summary.md"):
        assert (tmp_path / name).exists(), name
    assert summary["training"]["total_steps"] == 3 and summary["training"]["finished"]
    assert len(summary["scales"]) == 4 and set(summary["scales"]) <= {1, 3}
    assert set(summary["summary"]) == {"els", "ls", "is"}
    assert json.loads((tmp_path / "reproduction.json").read_text())["scales"] == summary["scales"]
    # a second run trains nothing, calibrates nothing and compares only new seeds
    mtime = (tmp_path / "calibration.json").stat().st_mtime_ns
    again = reproduce(tiny, tmp_path, progress=False, comparison_seeds=3)
    assert again["training"]["steps"] == 3
    assert (tmp_path / "calibration.json").stat().st_mtime_ns == mtime
    assert again["summary"]["els"]["n"] == 3


def test_train_steps_trains_on_and_never_reuses_a_stale_calibration(tiny, tmp_path):
    """`train_steps` replaces the preset's step count; a network.pt copied from a shorter run of the same preset
    trains on from it; a calibration (and comparison) made for the network at an earlier step is refused with a
    message naming what to remove, and after removing it the run completes for the new network."""
    import shutil

    from elsfast.nets.train import load_checkpoint

    short = tmp_path / "short"
    first = reproduce(tiny, short, progress=False, train_steps=2)
    assert first["training"]["steps"] == 2 and first["cost"]["network_steps"] == 2
    assert json.loads((short / "calibration.json").read_text())["network"].endswith("at step 2")

    longer = tmp_path / "longer"
    longer.mkdir()
    shutil.copy(short / "network.pt", longer / "network.pt")
    second = reproduce(tiny, longer, progress=False, train_steps=4, comparison_seeds=1)
    assert second["training"]["steps"] == 4 and second["summary"]["els"]["n"] == 1
    assert load_checkpoint(longer / "network.pt")[2]["step"] == 4

    # the short run's directory, trained on: its calibration names step 2, so it is refused, not reused
    with pytest.raises(ValueError, match=r"calibrated against .*at step 2.*remove"):
        reproduce(tiny, short, progress=False, train_steps=4)
    for stale in ("calibration.json", "calibration.png"):
        (short / stale).unlink()
    with pytest.raises(ValueError, match="another configuration"):  # report/ still holds the step-2 comparison
        reproduce(tiny, short, progress=False, train_steps=4)
    shutil.rmtree(short / "report")
    again = reproduce(tiny, short, progress=False, train_steps=4)
    assert again["training"]["steps"] == 4
    # the same network, trained the same way in one go or in two stages
    assert again["scales"] == second["scales"]
    with pytest.raises(ValueError, match="train_steps"):
        reproduce(tiny, tmp_path / "none", progress=False, train_steps=0)


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        reproduce("cifar-huge", tmp_path)
    assert "mnist-small" in PRESETS


def test_every_table1_row_is_a_preset_with_its_cost():
    """The ten CNN rows of the paper's Table 1 are presets with the paper's training, and their cost (network
    steps, evaluations, pairs) is counted before anything runs."""
    from elsfast import datasets
    from elsfast.research.reproduce import TABLE1, preset_cost

    assert len(TABLE1) == 10
    for dataset, arch, padding, conditional, machine, r in TABLE1:
        preset = PRESETS[f"{dataset}-{arch}-{padding}"]
        assert preset.train.arch == arch and preset.train.padding == padding
        assert preset.train.conditional == conditional and preset.calibrate_machine == machine
        assert preset.paper_r == r and preset.comparison_seeds == 100 and preset.train.epochs == 300
    assert PRESETS["faces-unet-zeros"].calibrate_machine == "ls"
    data = datasets.load("mnist-embedded", pad_to=32, limit=100)
    cost = preset_cost(PRESETS["mnist-resnet-circular"], data.images, data.labels)
    assert cost["network_steps"] == 300 * 1  # 100 images: one batch of 128 an epoch
    assert cost["pairs_per_evaluation"]["els"] == {3: 1024 * 1024 * 100, 17: 1024 * 1024 * 100}
    assert cost["pairs_per_evaluation"]["ls"][3] == 1024 * 100
    assert cost["pairs_per_evaluation"]["is"] == {3: 100}
    assert cost["comparison_evaluations"] == 100 * 19 * 3
    conditional = preset_cost(PRESETS["cifar10-resnet-zeros"], data.images[:, :1].expand(-1, 3, -1, -1), data.labels)
    assert conditional["pairs_per_evaluation"]["is"][3] == int((data.labels == data.labels[0]).sum())


def test_the_attention_presets_compare_at_the_resnet_scales_without_calibrating():
    """The paper's attention row: an attention UNet compared at the CIFAR-10 ResNet's P(t), not recalibrated."""
    from elsfast.common.scales import reference_scales

    small, paper = PRESETS["cifar10-sa-small"], PRESETS["cifar10-unet-sa-zeros"]
    assert small.train.arch == paper.train.arch == "unet-sa" and small.train.conditional and paper.train.conditional
    assert not small.needs_gpu and paper.needs_gpu and small.paper_r == paper.paper_r == 0.77
    committed = json.loads((ROOT / "docs/reproduction/cifar10-small/calibration.json").read_text())["scales"]
    assert list(small.scales) == committed  # cifar10-small's calibration, as measured
    assert paper.scales == "CIFAR10_ResNet_zeros_conditional" and paper.scales in reference_scales()


def test_a_preset_with_fixed_scales_trains_and_compares_without_calibrating(tiny, tmp_path):
    fixed = replace(
        tiny,
        train=replace(tiny.train, arch="unet-sa", channels=[4, 8], pad_to=32),
        scales=(1, 1, 3, 3),
        scales_source="given",
    )
    summary = reproduce(fixed, tmp_path, progress=False)
    assert not (tmp_path / "calibration.json").exists() and "calibration" not in summary["files"]
    assert summary["scales"] == [1, 1, 3, 3] and summary["scales_source"] == "given"
    assert summary["cost"]["calibration_evaluations"] == 0
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["config"]["scales"] == [1, 1, 3, 3]
    from elsfast.nets.train import load_checkpoint

    assert load_checkpoint(tmp_path / "network.pt")[1]["model"]["arch"] == "unet-sa"


# ---------------------------------------------------------------------------------------------- issue 27

TINY = """
from elsfast.nets.train import TrainConfig
from elsfast.research.reproduce import Preset

def tiny_preset(**train):
    config = dict(dataset="mnist-embedded", limit=40, arch="resnet", channels=8, blocks=1, conditional=True,
                  batch_size=8, checkpoint_every=100000)
    return Preset(train=TrainConfig(**{**config, **train}), sizes=(1, 3), calibration_seeds=1, comparison_seeds=1,
                  steps=3)
"""


def _tiny_preset(**train) -> Preset:
    scope: dict = {}
    exec(TINY, scope)
    return scope["tiny_preset"](**train)


def test_a_time_limited_reproduction_resumes_after_a_crash_and_is_never_redone(tmp_path, monkeypatch, capsys):
    """Issue 27: the time limit counts all runs together and is recorded when reached, so a crash in the
    comparison stage resumes without training again, and a finished reproduction run again redoes nothing."""
    import torch

    from elsfast.research import reproduce as reproduction

    timed = _tiny_preset(max_minutes=0.01)  # 0.6 s of training, far from its 300 epochs

    def crash(*args, **kwargs):
        raise RuntimeError("killed in the comparison")

    monkeypatch.setattr(reproduction, "compare", crash)
    with pytest.raises(RuntimeError, match="killed in the comparison"):
        reproduce(timed, tmp_path, progress=False)
    monkeypatch.undo()
    network, calibration = (tmp_path / "network.pt").read_bytes(), (tmp_path / "calibration.json").read_bytes()
    ckpt = torch.load(tmp_path / "network.pt", weights_only=True)
    assert ckpt["stopped"] == "time limit" and 0 < ckpt["step"] < ckpt["total_steps"]

    done = reproduce(timed, tmp_path, progress=False)  # the comparison resumes; nothing is trained again
    assert done["training"]["steps"] == ckpt["step"] and done["training"]["stopped"] == "time limit"
    assert (tmp_path / "network.pt").read_bytes() == network
    assert (tmp_path / "calibration.json").read_bytes() == calibration
    results = (tmp_path / "report" / "results.json").read_bytes()

    again = reproduce(timed, tmp_path, progress=True)  # finished: reports its results
    assert "nothing to train (its time limit was reached" in capsys.readouterr().err
    assert again["summary"] == done["summary"]
    assert (tmp_path / "network.pt").read_bytes() == network
    assert (tmp_path / "report" / "results.json").read_bytes() == results


def test_a_paper_scale_preset_without_a_gpu_is_refused_with_its_estimate(tmp_path):
    """Issue 27: `mnist-paper` and the Table 1 presets need a GPU; on a CPU they are refused unless forced, with
    the training time estimated, before anything is written."""
    from dataclasses import replace

    assert PRESETS["mnist-paper"].needs_gpu and PRESETS["cifar10-resnet-zeros"].needs_gpu
    assert not PRESETS["mnist-small"].needs_gpu
    big = replace(_tiny_preset(max_steps=100_000), needs_gpu=True)
    with pytest.raises(ValueError, match=r"needs a GPU: on this CPU its training alone would take about [\d,]+ h"):
        reproduce(big, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"force=True \(--force\)"):
        reproduce(big, tmp_path / "out", device="cpu", progress=False)


def test_cli_refuses_mnist_paper_on_a_cpu(tmp_path, shared_data, capsys):
    from elsfast.cli import main

    argv = ["reproduce", "mnist-paper", "--out-dir", str(tmp_path / "out"), "--device", "cpu", "-q"]
    assert main([*argv, "--data-root", str(shared_data)]) == 2
    err = capsys.readouterr().err
    assert "needs a GPU" in err and "--force" in err and " h (" in err, err
    assert not (tmp_path / "out").exists()


def _read_in_background(stream, into: list) -> None:
    import threading

    def pump():
        for chunk in iter(lambda: stream.read1(4096), b""):
            into.append(chunk)

    threading.Thread(target=pump, daemon=True).start()


@pytest.mark.usefixtures("ctrl_c")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_reproduction_keeps_its_training_and_resumes(tmp_path, sig):
    """Issue 27: SIGINT or SIGTERM before the first checkpoint (every 100,000 steps here) writes the training
    checkpoint, and the same reproduction run again trains on from it."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parents[1]
    script = TINY + "\nimport sys\nfrom elsfast.research.reproduce import reproduce\n"
    script += "reproduce(tiny_preset(max_steps=100000), sys.argv[1], progress=True)\n"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env, stderr=subprocess.PIPE)
    chunks: list[bytes] = []
    _read_in_background(proc.stderr, chunks)
    deadline = time.monotonic() + 120
    while not re.search(rb"training[^\r\n]*?\s([3-9]|\d\d+)/", b"".join(chunks)):
        assert proc.poll() is None, b"".join(chunks).decode()
        assert time.monotonic() < deadline, "the training did not start"
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=60)
    assert proc.returncode != 0
    ckpt = torch.load(tmp_path / "network.pt", weights_only=True)
    assert ckpt["stopped"] == "interrupted" and ckpt["step"] >= 3
    assert not (tmp_path / "calibration.json").exists()

    resumed = reproduce(_tiny_preset(max_steps=100000), tmp_path, progress=False, train_steps=ckpt["step"] + 1)
    assert resumed["training"]["steps"] == ckpt["step"] + 1 and resumed["training"]["finished"]


# ---------------------------------------------------------------------------------------------- issue 28, item 2


def test_every_preset_names_its_protocol_and_the_cpu_presets_keep_their_reports():
    """The paper-scale presets (Table 1 rows, mnist-paper, the attention UNet) and cifar10-sa-small compare with
    the paper's Table 1 protocol; the CPU presets with a committed report keep the protocol it measured."""
    from pathlib import Path

    from elsfast.research.protocols import PROTOCOLS
    from elsfast.research.reproduce import TABLE1

    table1 = {f"{d}-{a}-{p}" for d, a, p, *_ in TABLE1} | {"mnist-paper", "cifar10-unet-sa-zeros", "cifar10-sa-small"}
    for name, preset in PRESETS.items():
        assert preset.protocol in PROTOCOLS and PROTOCOLS[preset.protocol].steps == preset.steps, name
        assert (preset.protocol == "table1") == (name in table1), name
    reports = Path(__file__).resolve().parents[1] / "docs" / "reproduction"
    committed = [p for p in sorted(reports.glob("*/results.json")) if p.parent.name in PRESETS]
    assert {p.parent.name for p in committed} >= {"mnist-small", "fashion-mnist-small", "cifar10-small", "faces-small"}
    for path in committed:
        config = json.loads(path.read_text())["config"]
        protocol = PROTOCOLS[PRESETS[path.parent.name].protocol]
        assert (protocol.steps, protocol.network_steps) == (config["steps"], config["network_steps"]), path


def test_reproduce_with_a_protocol_records_it_and_refuses_another(tiny, tmp_path):
    """A preset's protocol runs the comparison (table1: the network 150 steps from the machines' t = 19/20);
    reproduction.json records it; `protocol=` overrides it, and a report/ made with another protocol is refused;
    a protocol whose machine steps are not the preset's is refused before any work."""
    from dataclasses import replace

    with pytest.raises(ValueError, match="protocol 'table1' runs the machines for 20 steps, but preset custom runs"):
        reproduce(replace(tiny, protocol="table1"), tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="protocol 'table2' runs the machines for 20 steps"):
        reproduce(tiny, tmp_path / "bad", progress=False, protocol="table2")
    with pytest.raises(ValueError, match="unknown protocol"):
        reproduce(replace(tiny, steps=20), tmp_path / "bad", progress=False, protocol="table9")
    assert not (tmp_path / "bad").exists()

    preset = replace(tiny, steps=20, protocol="table1", machines=("is",), scales=(3,) * 20, comparison_seeds=1)
    summary = reproduce(preset, tmp_path, progress=False, train_steps=1)
    saved = json.loads((tmp_path / "reproduction.json").read_text())
    for record in (summary, saved):
        assert record["protocol"] == "table1" and record["steps"] == 20
        assert record["network_steps"] == 150 and record["network_start_t"] == 0.95
    report = json.loads((tmp_path / "report" / "results.json").read_text())["config"]
    assert (report["protocol"], report["network_steps"]) == ("table1", 150)
    with pytest.raises(ValueError, match="network_steps: saved 150, now 20"):
        reproduce(preset, tmp_path, progress=False, train_steps=1, protocol="table2")
    assert reproduce(preset, tmp_path, progress=False, train_steps=1)["protocol"] == "table1"
