"""The core reduction: the merge monoid, the registry and dispatch."""

from typing import ClassVar

import pytest
import torch

from elsfast.reduce import (
    Backend,
    BackendUnavailable,
    ImageDictionary,
    PatchDictionary,
    ReduceState,
    backend_names,
    backend_reasons,
    softmax_reduce,
)
from elsfast.reduce.registry import _REGISTRY, register_backend


def _state(logits, values):
    return ReduceState.from_logits(logits.clone(), values)


def test_merge_is_associative_and_matches_one_pass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 30, generator=g, dtype=torch.float64) * 20
    values = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    whole = _state(logits, values).finalize()
    parts = [(0, 4), (4, 5), (5, 21), (21, 30)]
    states = [_state(logits[..., a:b], values[:, a:b]) for a, b in parts]

    left = ReduceState.empty(2, 5, 3, dtype=torch.float64, device=torch.device("cpu"))
    for s in states:
        left.merge_(s)
    right_inner = states[2].merge_(states[3])
    right = states[0].merge_(states[1].merge_(right_inner))
    torch.testing.assert_close(left.finalize(), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(right.finalize(), whole, rtol=0, atol=1e-12)


def test_empty_state_is_neutral():
    values = torch.randn(1, 4, 2, dtype=torch.float64)
    s = _state(torch.randn(1, 3, 4, dtype=torch.float64), values)
    expected = s.finalize().clone()
    empty = ReduceState.empty(1, 3, 2, dtype=torch.float64, device=torch.device("cpu"))
    torch.testing.assert_close(empty.merge_(s).finalize(), expected)
    empty2 = ReduceState.empty(1, 3, 2, dtype=torch.float64, device=torch.device("cpu"))
    torch.testing.assert_close(s.merge_(empty2).finalize(), expected)


def test_merge_keeps_far_apart_scales():
    # logits 2000 bits apart: naive sums over- or underflow, the stabilised merge does not
    a = _state(torch.tensor([[[0.0]]], dtype=torch.float32), torch.tensor([[[1.0]]]))
    b = _state(torch.tensor([[[2000.0]]], dtype=torch.float32), torch.tensor([[[-1.0]]]))
    assert a.merge_(b).finalize().item() == -1.0


def test_softmax_reduce_reports_work():
    images = torch.rand(5, 1, 4, 4) * 2 - 1
    d = ImageDictionary(images)
    q = torch.randn(1, 3, 16)
    r = softmax_reduce(q, d, abar=0.5)
    assert r.values.shape == (1, 3, 16) and r.backend == "torch" and r.chunks == 1
    assert r.pairs == r.exact_pairs == 15 and r.group_backends == ("torch",)


def test_named_backend_that_cannot_run_raises_with_reasons():
    @register_backend
    class NeverBackend(Backend):
        NAME = "never-test"
        LIMITS: ClassVar[dict[str, str]] = {"quantum": "needs a quantum computer"}

        def unsupported_reasons(self, queries, dictionary):
            return [self.refuse("quantum")]

    try:
        images = torch.rand(3, 1, 4, 4) * 2 - 1
        d = PatchDictionary(images, 3, "zeros", torch.arange(16).view(1, 16))
        q = torch.randn(1, 2, 9)
        assert backend_reasons(q, d)["never-test"] == ["needs a quantum computer"]
        with pytest.raises(BackendUnavailable, match="quantum") as refusal:
            softmax_reduce(q, d, abar=0.5, backend="never-test")
        assert refusal.value.reasons == ["needs a quantum computer"]
        # auto follows its rule list (elsfast.reduce.policy), which names no unlisted backend
        assert softmax_reduce(q, d, abar=0.5).backend in ("cpu", "torch")
    finally:
        del _REGISTRY["never-test"]
    assert "never-test" not in backend_names()


def test_unknown_backend_name():
    images = torch.rand(3, 1, 4, 4) * 2 - 1
    with pytest.raises(ValueError, match="unknown backend"):
        softmax_reduce(torch.randn(1, 2, 16), ImageDictionary(images), abar=0.5, backend="nope")
