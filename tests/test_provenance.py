"""Per-pixel provenance (dominant dictionary entry, its weight, posterior entropy) against the float64 brute
force, on the paper's Fig. 3 toy and on the IS machine (issue #7)."""

import math

import numpy as np
import pytest
import torch
from problems import COMBOS, reference, stable_seed

import elsfast
from elsfast import ScoreMachine
from elsfast.reduce import ReduceState


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("abar", [0.2, 0.9])
@pytest.mark.parametrize(("machine", "padding"), COMBOS)
def test_provenance_matches_reference(machine, padding, abar, conditional):
    g = torch.Generator().manual_seed(stable_seed("provenance", machine, padding, abar, conditional))
    N, B, H, W = 6, 3, 5, 6
    train = torch.rand(N, 2, H, W, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(B, 2, H, W, generator=g, dtype=torch.float64)
    train_labels = torch.tensor([0, 1, 2, 0, 1, 2]) if conditional else None
    labels = torch.tensor([2, 0, 2]) if conditional else None
    m = ScoreMachine(train, train_labels, machine=machine, padding=padding, dtype=torch.float64, memory_budget=1)
    out, prov = m.denoise(x, abar, 3, labels, return_provenance=True)
    torch.testing.assert_close(out, m.denoise(x, abar, 3, labels))  # tracking does not change the output
    ref = reference(x, train, abar, machine, padding, 3, labels, train_labels, provenance=True)
    got = [prov.source_image, prov.source_y, prov.source_x]
    for name, a, b in zip(("image", "y", "x"), got, ref[:3], strict=True):
        np.testing.assert_array_equal(a.numpy(), b, err_msg=name)
    np.testing.assert_allclose(prov.weight.numpy(), ref[3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(prov.entropy.numpy(), ref[4], rtol=0, atol=1e-9)


def test_entropy_and_weight_merge_across_chunks():
    # one softmax split into unequal tiles, merged in two different orders
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 4, 50, generator=g, dtype=torch.float64) * 5
    values = torch.randn(1, 50, 2, generator=g, dtype=torch.float64)
    ids = torch.arange(50)
    states = [
        ReduceState.from_logits(logits[..., a:b].clone(), values[:, a:b], ids[a:b])
        for a, b in [(0, 7), (7, 8), (8, 31), (31, 50)]
    ]
    total = ReduceState.empty(1, 4, 2, dtype=torch.float64, device=torch.device("cpu"), provenance=True)
    for s in states[::-1]:
        total.merge_(s)
    p = torch.softmax(logits * math.log(2), dim=-1)  # logits are in bits
    torch.testing.assert_close(total.best, p.argmax(-1))
    torch.testing.assert_close(total.top_weight(), p.max(-1).values)
    torch.testing.assert_close(total.entropy(), -(p * p.log()).sum(-1))


def test_fig3_toy_pixels_come_from_the_image_of_their_colour():
    train = torch.stack([-torch.ones(1, 16, 16), torch.ones(1, 16, 16)])  # image 0 black, image 1 white
    out, trace = elsfast.sample(
        train, n=4, machine="els", padding="circular", steps=50, seed=3, progress=False, return_provenance=True
    )
    colour_of_source = trace.provenance.source_image.float() * 2 - 1
    torch.testing.assert_close(colour_of_source, out[:, 0].sign())
    assert trace.entropy.shape == (49, 4, 16, 16)
    assert trace.times == [i / 50 for i in range(49, 0, -1)] and trace.patch_sizes == [3] * 49
    # the 256 patches of a uniform image are identical, so each colour's posterior mass spreads evenly over its
    # 256 positions: entropy = ln 256 + (entropy of the black/white split) lies in [ln 256, ln 512]
    entropy = trace.provenance.entropy
    assert (entropy >= math.log(256) - 1e-4).all() and (entropy <= math.log(512) + 1e-4).all()
    assert (entropy < math.log(256) + 1e-3).float().mean() > 0.95  # almost every pixel has settled on a colour


def test_ideal_score_machine_has_one_source_per_sample():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    out, trace = elsfast.sample(train, n=5, machine="is", steps=20, progress=False, return_provenance=True)
    prov = trace.provenance
    for k in range(5):
        assert prov.source_image[k].unique().numel() == 1
        dy, dx = prov[k].offsets()
        assert (dy == 0).all() and (dx == 0).all()
        # the sample is a copy of its source image
        torch.testing.assert_close(out[k], train[prov.source_image[k, 0, 0]], atol=1e-4, rtol=0)
    assert (prov.weight > 0.999).all()
