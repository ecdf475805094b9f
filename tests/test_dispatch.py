"""Dispatch, reports and caches: `auto` is exact and decided without side effects, reports name what ran, and
every in-memory cache has an owner, a byte bound and a way to clear it; no cache keeps a training set alive."""

import gc
import importlib.util
import weakref

import pytest
import torch
from problems import make_problem

import elsfast
from elsfast import ScoreMachine
from elsfast.reduce import (
    PatchDictionary,
    TopK,
    backend_names,
    cache_info,
    clear_caches,
    dedup_backend,
    policy,
    shift_backend,
    softmax_reduce,
)
from elsfast.reduce.caches import MemoryCache, content_hash
from elsfast.reduce.patches import extract_patches, group_sets
from elsfast.reduce.registry import get_backend


def test_auto_rules_name_only_exact_registered_backends():
    names = [rule.backend.NAME for rule in policy.RULES]
    assert len(names) == len(set(names)) and set(names) <= set(backend_names())
    assert all(rule.backend.EXACT for rule in policy.RULES)
    assert names[-1] == "torch"  # the rule that runs every problem comes last
    assert {name for name in backend_names() if not get_backend(name).EXACT} == {"topk"}


def test_choosing_a_backend_has_no_side_effects(cpu_ext, monkeypatch):
    """`unsupported_reasons` and `auto`'s choice build nothing: no dedup table, no query-image rebuild."""
    monkeypatch.setattr(policy, "DEDUP_MIN_ENTRIES", 10)
    monkeypatch.setattr(policy, "DEDUP_MAX_PATCH_SIZE", 3)
    monkeypatch.setattr(dedup_backend, "distinct_entries", lambda *a, **k: pytest.fail("built a table"))
    monkeypatch.setattr(shift_backend, "query_images", lambda *a, **k: pytest.fail("rebuilt the query images"))
    train, x, _, _ = make_problem(1, 30, 1, 12, 12, 2, 0.5)
    for P in (3, 7):
        positions = group_sets(12, 12, P, "zeros", "els")[0]
        queries = extract_patches(x, P, "zeros", positions).reshape(positions.shape[0], -1, P * P)
        dictionary = PatchDictionary(train, P, "zeros", positions)
        elsfast.reduce.backend_reasons(queries, dictionary)
        want = "dedup" if P == 3 else "shifts"
        assert want == next(policy.auto_candidates(queries, dictionary)).NAME  # what `run` tries first


def test_reports_name_what_ran_per_group(cpu_ext):
    """Dedup's groups that repeat too little run on the cpu kernel; the report says so per group, and counts the
    pairs scored beside those of the exact problem."""
    g = torch.Generator().manual_seed(3)
    flat = torch.zeros(40, 1, 9, 9, dtype=torch.uint8)
    flat[:, :, 4, 4] = 255  # one stroke pixel: the interior group repeats its keys, many times over
    noise = torch.randint(0, 256, (40, 1, 9, 9), generator=g, dtype=torch.uint8)
    x = torch.randn(2, 1, 9, 9, generator=g)
    for train, want in ((flat, "dedup"), (noise, "cpu")):
        m = ScoreMachine(train, backend=elsfast.Dedup(min_duplication=1.5))
        m.denoise(x, 0.5, 3)
        assert want in m.last_stats.backends
        assert m.last_stats.pairs <= m.last_stats.exact_pairs
        assert sum(m.last_stats.group_backends.values()) == sum(len(p) for p in group_sets(9, 9, 3, "zeros", "els"))
    m = ScoreMachine(noise, backend=elsfast.Dedup(min_duplication=1.5))
    m.denoise(x, 0.5, 3)
    assert m.last_stats.backends == {"cpu"} and m.last_stats.pairs == m.last_stats.exact_pairs
    m = ScoreMachine(flat, backend=elsfast.Dedup())
    m.denoise(x, 0.5, 3)
    assert m.last_stats.backends == {"dedup"} and m.last_stats.pairs < m.last_stats.exact_pairs


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="top-k needs faiss (pip install elsfast[faiss])")
def test_topk_reports_its_exact_fallback_per_group():
    train, x, _, _ = make_problem(4, 30, 1, 8, 8, 2, 0.5)
    backend = TopK(k=4, index="flat", min_entries=1, min_pass_fraction=0.0, cache_dir="", progress=False)
    r_low = ScoreMachine(train, backend=backend)
    r_low.denoise(x, 0.01, 3)  # high noise: no query certified, every group on the exact fallback
    assert r_low.last_stats.approximate_queries == 0 and "topk" not in r_low.last_stats.backends
    assert r_low.last_stats.pairs == r_low.last_stats.exact_pairs
    r_high = ScoreMachine(train, backend=backend)
    r_high.denoise(x, 0.9999, 3)
    stats = r_high.last_stats
    assert stats.approximate_queries > 0 and "topk" in stats.backends and stats.pairs < stats.exact_pairs
    assert all(name.split("+")[0] in ("topk", "cpu", "torch") for name in stats.group_backends)


def test_memory_cache_is_bounded_and_clears_by_tag():
    cache = MemoryCache("test cache", 100, len)
    cache.put("a", b"x" * 60, tags=["one"])
    cache.put("b", b"x" * 30, tags=["two"])
    assert len(cache) == 2 and cache.nbytes == 90
    cache.put("c", b"x" * 30, tags=["one"])  # over the bound: the least recently used ("a") goes
    assert "a" not in cache and len(cache) == 2
    cache.put("d", b"x" * 500)  # alone over the bound: kept, the rest goes
    assert list(cache._entries) == ["d"]
    cache.put("e", b"x", tags=["one"])  # "d" is now the least recently used, over the bound
    cache.put("f", b"x", tags=["two"])
    assert list(cache._entries) == ["e", "f"]
    assert clear_caches("one") >= 1 and "e" not in cache and "f" in cache
    assert any(info["name"] == "test cache" for info in cache_info())
    assert cache.clear() == 1 and len(cache) == 0


def test_no_cache_keeps_a_training_set_alive(cpu_ext):
    """After dedup tables, a top-k index and the content-hash memo were built from a training set, dropping the
    machine and the images frees them (no cache refers to them); the derived tables stay until their training
    set's tag is cleared."""
    train = (torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(5)) < 0.1).to(torch.uint8) * 255
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    m = ScoreMachine(train, backend="dedup")
    m.denoise(x, 0.5, 3)
    tag = content_hash(m.images)
    assert any(tag in tags for _, _, tags in dedup_backend.TABLES._entries.values())
    if importlib.util.find_spec("faiss") is not None:
        backend = TopK(k=4, index="flat", min_entries=1, min_pass_fraction=0.0, cache_dir="", progress=False)
        ScoreMachine(train, backend=backend).denoise(x, 0.999, 3)
        assert len(backend._indexes) > 0
    alive = weakref.ref(train)
    images = weakref.ref(m.images)
    del m, train
    gc.collect()
    assert alive() is None and images() is None  # no cache holds the images
    assert any(tag in tags for _, _, tags in dedup_backend.TABLES._entries.values())  # the tables stay
    assert clear_caches(tag) > 0
    assert not any(tag in tags for _, _, tags in dedup_backend.TABLES._entries.values())


def test_clear_caches_empties_everything(cpu_ext):
    train = (torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(7)) < 0.1).to(torch.uint8) * 255
    ScoreMachine(train, backend="dedup").denoise(torch.randn(1, 1, 8, 8), 0.5, 3)
    assert len(dedup_backend.TABLES) > 0
    elsfast.clear_caches()
    assert all(info["entries"] == 0 for info in cache_info())


def test_empty_dictionary_and_empty_batch_report_no_backend():
    d = PatchDictionary(torch.rand(0, 1, 4, 4), 3, "zeros", torch.arange(16).view(1, 16))
    r = softmax_reduce(torch.zeros(1, 2, 9), d, abar=0.5)
    assert r.group_backends == ("none",) and r.pairs == r.exact_pairs == 0


def test_refusals_describe_the_problem(cpu_ext, monkeypatch):
    """A named backend's refusal and `auto`'s "no backend can run" name the queries' shape, dtype and device and
    the dictionary's machine, patch size, padding and images (as xformers' `_format_inputs_description`)."""
    train = torch.rand(3, 1, 4, 4)
    dictionary = PatchDictionary(train, 3, "zeros", torch.arange(16).view(1, 16))
    queries = torch.zeros(1, 2, 9, dtype=torch.float64)
    described = ["queries (G=1, M=2, D=9) float64 on cpu", "P=3 zeros padding", "training images [3, 1, 4, 4] float32"]
    with pytest.raises(elsfast.reduce.BackendUnavailable) as named:
        softmax_reduce(queries, dictionary, abar=0.5, backend="cpu")
    cpu_only = tuple(rule for rule in policy.RULES if rule.backend.NAME == "cpu")
    monkeypatch.setattr(policy, "RULES", cpu_only)
    with pytest.raises(elsfast.reduce.BackendUnavailable, match="no backend can run") as auto:
        softmax_reduce(queries, dictionary, abar=0.5)
    for refusal in (named.value, auto.value):
        for text in [*described, "computes in float32"]:
            assert text in str(refusal)


def test_topk_gets_its_exact_fallback_from_the_dispatcher():
    """Backends do not call the dispatcher: top-k's exact fallback is passed in by `policy.run` (the one selection
    path), and no backend module imports `policy`."""
    import ast
    import inspect

    for module in (elsfast.reduce.topk, dedup_backend, shift_backend, elsfast.reduce.cpu_backend):
        imported = {a.name for n in ast.walk(ast.parse(inspect.getsource(module))) if isinstance(n, ast.ImportFrom)
                    for a in n.names}  # fmt: skip
        assert "policy" not in imported, module.__name__
    assert "exact" in inspect.signature(TopK.reduce).parameters
    assert not hasattr(policy, "select_backend")
