"""The reproduction pipeline end to end on a tiny preset, and its resumability."""

import json

import pytest

from elsfast.reproduce import PRESETS, Preset, reproduce
from elsfast.train import TrainConfig


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


def test_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        reproduce("cifar-huge", tmp_path)
    assert "mnist-small" in PRESETS
