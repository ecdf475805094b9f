"""Long runs say what they will cost before they start (issue 15, item 11)."""

import math

import pytest
import torch

import elsfast
from elsfast.common.scales import resolve_patch_size
from elsfast.sampling import estimate
from elsfast.sampling.estimate import estimate_sample, evaluation_pairs


@pytest.mark.parametrize(("machine", "padding"), [("is", "zeros"), ("es", "circular"), ("ls", "zeros"),
                                                  ("els", "zeros"), ("els", "circular")])  # fmt: skip
def test_evaluation_pairs_are_what_denoise_reports(machine, padding):
    g = torch.Generator().manual_seed(0)
    m = elsfast.ScoreMachine(torch.rand(7, 1, 6, 5, generator=g) * 2 - 1, torch.arange(7) % 3, machine=machine,
                             padding=padding)  # fmt: skip
    x = torch.randn(3, 1, 6, 5, generator=g)
    for P in (1, 3, 5, 11) + ((13,) if padding == "zeros" else ()):  # circular refuses P > 2 max(H, W) - 1
        for labels in (None, torch.tensor([2, 0, 2])):
            m.denoise(x, 0.5, P, labels)
            assert evaluation_pairs(m, 3, P, labels) == m.last_stats.pairs


def test_the_estimate_adds_the_steps_and_times_them():
    g = torch.Generator().manual_seed(1)
    m = elsfast.ScoreMachine(torch.rand(20, 1, 8, 8, generator=g) * 2 - 1)
    size_at = resolve_patch_size([3, 3, 5, 5, 7, 9], 6)
    plan = estimate_sample(m, 2, 6, size_at, calibrate=False)
    assert plan.evaluations == 5 and math.isnan(plan.seconds)
    assert plan.pairs == sum(evaluation_pairs(m, 2, size_at(i / 6, i)) for i in range(1, 6))
    timed = estimate_sample(m, 2, 6, size_at)
    assert timed.pairs == plan.pairs and math.isfinite(timed.seconds) and timed.seconds > 0
    assert sorted(timed.rates) == [3, 5, 7, 9] and all(r > 0 for r in timed.rates.values())
    resumed = estimate_sample(m, 2, 6, size_at, calibrate=False, start=2)
    assert resumed.evaluations == 2
    assert "5 evaluations of 2 image(s)" in timed.describe(2) and "on this machine" in timed.describe(2)


def test_only_long_runs_print_an_estimate(capsys, monkeypatch):
    train = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(2)) * 2 - 1
    elsfast.sample(train, n=1, steps=3, progress=True)
    assert "query x dictionary pairs" not in capsys.readouterr().err
    monkeypatch.setattr(estimate, "LONG_RUN_PAIRS", 10)
    monkeypatch.setattr(elsfast.sampling.sampler, "LONG_RUN_PAIRS", 10)
    elsfast.sample(train, n=1, steps=3, progress=True)
    err = capsys.readouterr().err
    assert "elsfast: sampling 2 evaluations of 1 image(s)" in err and "on this machine" in err
    elsfast.sample(train, n=1, steps=3, progress=False)
    assert "pairs" not in capsys.readouterr().err
