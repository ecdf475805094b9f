"""Creativity measures on tiny cases computed by hand (issue #7)."""

import math

import pytest
import torch

from elsfast import ScoreMachine
from elsfast.research import creativity


def test_nearest_training_and_memorisation():
    train = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    samples = torch.stack([torch.full((1, 2, 2), 0.6), torch.zeros(1, 2, 2)])
    rms, index = creativity.nearest_training(samples, train, chunk=2)  # chunk 2: the scan crosses a chunk border
    assert index.tolist() == [2, 1]
    assert rms.tolist() == pytest.approx([0.4, 0.0])


def test_nearest_training_accepts_uint8():
    train = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    rms, index = creativity.nearest_training(torch.full((1, 1, 2, 2), 0.9), train)
    assert index.item() == 1 and rms.item() == pytest.approx(0.1)


def test_source_regions():
    grid = torch.tensor([[[0, 0, 1], [0, 1, 1], [2, 2, 1]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]]])
    assert creativity.source_regions(grid) == [[4, 3, 2], [5, 1, 1, 1, 1]]


@pytest.fixture
def toy():
    train = torch.stack([-torch.ones(1, 4, 4), torch.ones(1, 4, 4)])
    return ScoreMachine(train, machine="els", padding="circular")


def test_local_consistency_by_hand(toy):
    black = -torch.ones(1, 1, 4, 4)
    one_white = black.clone()
    one_white[0, 0, 1, 2] = 1.0
    # the lone white pixel's 3x3 neighbourhood is nearest to the all-black patch (distance 4 against 32): its
    # centre (-1) differs from the pixel; the other 15 pixels agree with their nearest (black) patch
    scores = creativity.local_consistency(toy, torch.cat([black, one_white]), 3)
    assert scores.tolist() == pytest.approx([1.0, 15 / 16])


def test_measure_by_hand(toy):
    one_white = -torch.ones(1, 1, 4, 4)
    one_white[0, 0, 1, 2] = 1.0
    (m,) = creativity.measure(toy, one_white, patch_size=3)
    assert m["nearest_training_index"] == 0
    assert m["nearest_training_rms"] == pytest.approx(math.sqrt(4 / 16))
    assert not m["memorised"]
    assert m["distinct_sources"] == 1  # every neighbourhood is nearest to a black patch
    assert m["region_sizes"] == [16] and m["largest_region_fraction"] == 1.0
    assert m["local_consistency"] == pytest.approx(15 / 16)
    # all 16 black patches are equally near: the posterior is uniform over them
    assert m["mean_entropy_nats"] == pytest.approx(math.log(16), abs=1e-4)
    (copy,) = creativity.measure(toy, torch.ones(1, 1, 4, 4), patch_size=3)
    assert copy["memorised"] and copy["nearest_training_index"] == 1 and copy["local_consistency"] == 1.0
