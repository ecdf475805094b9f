"""Module-like conventions of ScoreMachine: .to(), config export and reload (issue #6, part 5)."""

import json

import pytest
import torch

from elsfast import ScoreMachine


def test_to_moves_and_casts_in_place():
    train = torch.rand(5, 1, 6, 6) * 2 - 1
    m = ScoreMachine(train, torch.tensor([0, 1, 0, 1, 1]))
    x = torch.randn(2, 1, 6, 6)
    before = m.denoise(x, 0.5, 3, labels=[0, 1])
    assert m.to(dtype=torch.float64) is m
    assert m.dtype == torch.float64 and m.images.dtype == torch.float64
    after = m.denoise(x.double(), 0.5, 3, labels=[0, 1])
    assert after.dtype == torch.float64
    torch.testing.assert_close(after.float(), before, atol=1e-5, rtol=0)
    assert m.denoise(x, 0.5, 3, labels=[0, 1]).dtype == torch.float32  # computed in float64, returned as x
    assert m.to("cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="dtype"):
        m.to(dtype=torch.float16)


def test_uint8_stays_uint8_under_to():
    m = ScoreMachine(torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)).to(dtype=torch.float64)
    assert m.images.dtype == torch.uint8 and m.dtype == torch.float64


def test_save_and_reload_from_dataset_reference(tmp_path):
    m = ScoreMachine.from_dataset("mnist-embedded", limit=30, machine="ls", padding="circular")
    path = m.save_pretrained(tmp_path / "model")
    config = json.loads(path.read_text())
    assert config["source"] == {"dataset": "mnist-embedded", "split": "train", "pad_to": None, "limit": 30}
    assert config["machine"] == "ls" and config["conditional"] and config["train_shape"] == [30, 1, 28, 28]
    again = ScoreMachine.from_pretrained(tmp_path / "model")
    assert (again.machine, again.padding, again.fingerprint) == ("ls", "circular", m.fingerprint)
    x = torch.randn(1, 1, 28, 28)
    torch.testing.assert_close(again.denoise(x, 0.4, 3, [7]), m.denoise(x, 0.4, 3, [7]))


def test_reload_checks_the_training_set(tmp_path):
    train = torch.rand(4, 1, 5, 5) * 2 - 1
    ScoreMachine(train, machine="is").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="records no dataset"):
        ScoreMachine.from_pretrained(tmp_path)
    assert ScoreMachine.from_pretrained(tmp_path, train_images=train).machine == "is"
    with pytest.raises(ValueError, match="training set differs"):
        ScoreMachine.from_pretrained(tmp_path, train_images=train.flip(0))
    (tmp_path / "elsfast_machine.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not an elsfast machine config"):
        ScoreMachine.from_pretrained(tmp_path)
