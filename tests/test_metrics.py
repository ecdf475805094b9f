"""Per-image agreement measures (SPEC section 3): Pearson r (the paper's "r^2"), R^2 and cosine similarity."""

import math

import numpy as np
import pytest
import torch

from elsfast.research.metrics import cosine_similarity, pearson_r, r_squared


def img(*values):
    """One 1-channel image per row of values, laid out as [n, 1, 1, len]."""
    return torch.tensor(values, dtype=torch.float64).reshape(len(values), 1, 1, -1)


def test_pearson_r_by_hand():
    # centred: a = (-1, 0, 1), b = (-1, 1, 0): dot 1, norms sqrt(2) -> 1/2
    assert pearson_r(img([1, 2, 3]), img([1, 3, 2])).tolist() == pytest.approx([0.5])
    r = pearson_r(img([1, 2, 3, 4], [1, 2, 3, 4]), img([2, 4, 6, 8], [4, 3, 2, 1]))
    assert r.shape == (2,) and r.dtype == torch.float64
    assert r.tolist() == pytest.approx([1.0, -1.0])
    # invariant to a positive affine map of either image, symmetric
    a, b = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    torch.testing.assert_close(pearson_r(a, b), pearson_r(3 * a + 7, b - 2))
    torch.testing.assert_close(pearson_r(a, b), pearson_r(b, a))


def test_pearson_r_flattens_channels_and_pixels_together():
    a, b = torch.randn(4, 3, 5, 6), torch.randn(4, 3, 5, 6)
    want = [np.corrcoef(a[k].flatten().numpy(), b[k].flatten().numpy())[0, 1] for k in range(4)]
    assert pearson_r(a, b).tolist() == pytest.approx(want, abs=1e-6)


def test_r_squared_by_hand():
    ref = img([1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3])
    pred = img([1, 2, 4], [1, 2, 3], [2, 2, 2], [3, 2, 1])
    # SS_tot = 2; SS_res = 1, 0, 2, 8
    assert r_squared(pred, ref).tolist() == pytest.approx([0.5, 1.0, 0.0, -3.0])
    # the reference matters: swapping the arguments changes the value
    # ref (0, 2, 4): SS_tot = 8, SS_res = 2; ref (1, 2, 3): SS_tot = 2, SS_res = 2
    assert r_squared(img([1, 2, 3]), img([0, 2, 4])).item() == pytest.approx(0.75)
    assert r_squared(img([0, 2, 4]), img([1, 2, 3])).item() == pytest.approx(0.0)


def test_cosine_similarity_by_hand():
    c = cosine_similarity(img([1, 0], [1, 2], [1, 1]), img([1, 1], [-2, 1], [-3, -3]))
    assert c.tolist() == pytest.approx([1 / math.sqrt(2), 0.0, -1.0])
    # uncentred: a shift changes it (unlike pearson_r)
    assert cosine_similarity(img([1, 2]), img([2, 1])).item() == pytest.approx(4 / 5)


def test_degenerate_inputs():
    assert math.isnan(pearson_r(img([2, 2, 2]), img([1, 2, 3])).item())
    assert math.isnan(r_squared(img([1, 2, 3]), img([2, 2, 2])).item())
    assert r_squared(img([2, 2, 2]), img([1, 2, 3])).item() == pytest.approx(0.0)
    assert math.isnan(cosine_similarity(img([0, 0]), img([1, 2])).item())
    with pytest.raises(ValueError, match="same shape"):
        pearson_r(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match="batch"):
        r_squared(torch.zeros(3), torch.zeros(3))
