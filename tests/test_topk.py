"""The top-k backend: the certified bound on the neglected posterior mass against a float64 brute force, agreement
with the exact machine within the tolerance, the fall-back policy, the index cache, and its errors."""

from __future__ import annotations

import math

import pytest
import torch
from problems import fp32_tolerance

import elsfast
from elsfast.reduce import PatchDictionary, TopK, softmax_reduce
from elsfast.reduce import topk as topk_module
from elsfast.reduce import topk_index as topk_index_module
from elsfast.reduce.registry import _REGISTRY, BackendUnavailable
from elsfast.reduce.topk_index import faiss_or_reason

pytest.importorskip("faiss", reason="the top-k backend needs faiss (pip install 'elsfast[faiss]')")

SMALL = dict(min_entries=1000, cache_dir="", progress=False)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """110 embedded MNIST digits, centre 16x16 crops, uint8 `[110, 1, 16, 16]`: real structure, small problems."""
    return elsfast.datasets.load("mnist-embedded", limit=110).images[:, :, 6:22, 6:22].contiguous()


def noisy(clean_uint8: torch.Tensor, abar: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = clean_uint8.double() / 127.5 - 1
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(x0.shape, generator=g, dtype=torch.float64)


def true_neglected(dg: PatchDictionary, q: torch.Tensor, ids: torch.Tensor, abar: float) -> torch.Tensor:
    """float64 brute force: the posterior mass of all entries whose key is none of the keys of the entries `ids`
    `(m, k)` (-1: none) kept for each query, `(m,)`."""
    n = dg.num_images
    keys, _ = dg.entries(0, n, torch.float64)  # entry-major: row s * n + i holds entry id i * S + s
    a, T = math.sqrt(abar), 2 * (1 - abar)
    post = torch.softmax(-torch.cdist(q.double(), a * keys[0]).square() / T, dim=1)
    _, key_of_row, _ = torch.unique(keys[0], dim=0, return_inverse=True, return_counts=True)
    post_per_key = torch.zeros(len(q), int(key_of_row.max()) + 1, dtype=torch.float64).index_add_(1, key_of_row, post)
    image, position = dg.decode_ids(ids.clamp(min=0))
    kept_keys = key_of_row[position * n + image]
    kept = torch.where(ids >= 0, post_per_key.gather(1, kept_keys), 0.0).sum(1)
    return (1 - kept).clamp(min=0)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize(
    ("kind", "storage", "images"), [("flat", "auto", "uint8"), ("ivf", "auto", "uint8"), ("ivf", "float16", "float")]
)
def test_bound_holds_against_brute_force(digits, padding, kind, storage, images):
    train = digits[:100] if images == "uint8" else digits[:100].float() / 127.5 - 1
    P = 3
    group_set = elsfast.reduce.patches.group_sets(16, 16, P, padding, "els")
    backend = TopK(k=16, tolerance=None, index=kind, storage=storage, nlist=32, nprobe=3, **SMALL)
    checked = 0
    for abar in (0.05, 0.5, 0.9, 0.999):
        x = noisy(digits[100:102], abar)
        for positions in group_set[:2]:  # the interior (or only) group and one border class
            dg = PatchDictionary(train, P, padding, positions[:1])
            q = elsfast.reduce.patches.extract_patches(x, P, padding, positions[:1]).reshape(-1, P * P)
            gi = backend._group_index(dg, backend._key(dg), q, abar, 64 << 20)
            _, bound, ids = backend._search_block(gi, dg, q, abar, provenance=False)
            truth = true_neglected(dg, q, ids, abar)
            assert (truth <= bound * (1 + 1e-9) + 1e-12).all(), (abar, float((truth - bound).max()))
            checked += len(q)
    assert checked > 0


def test_bound_is_tight_enough_to_be_useful(digits):
    """At low noise the exact top-k of a flat index certifies almost every query below 1e-4 (measured: 99% at
    abar = 0.999 with k = 128; 53% at abar = 0.99, where near-black background patches of MNIST are many and
    nearly equally likely, so that even the true neglected mass exceeds 1e-4 for 42% of the queries)."""
    dg = PatchDictionary(digits[:100], 3, "zeros", elsfast.reduce.patches.group_sets(16, 16, 3, "zeros", "els")[0][:1])
    backend = TopK(k=128, tolerance=None, index="flat", **SMALL)
    x = noisy(digits[100:102], 0.999)
    q = elsfast.reduce.patches.extract_patches(x, 3, "zeros", dg.positions).reshape(-1, 9)
    gi = backend._group_index(dg, backend._key(dg), q, 0.999, 64 << 20)
    assert gi.size < gi.total  # repeated keys (black background) are indexed once, with their count
    _, bound, _ = backend._search_block(gi, dg, q, 0.999, provenance=False)
    assert (bound <= 1e-4).double().mean() > 0.9


@pytest.mark.parametrize(("machine", "padding"), [("els", "zeros"), ("els", "circular"), ("ls", "zeros")])
@pytest.mark.parametrize("conditional", [False, True])
def test_machine_within_tolerance_of_exact(digits, machine, padding, conditional):
    """Against the exact machine in float64: a float64 top-k machine within 2 * tol (values lie in [-1, 1], so the
    error is at most twice the neglected mass), the float32 one within 2 * tol plus the float32 rounding bound of
    tests/problems.py (at abar = 0.9995 the exact float32 path itself is 2e-4 away from float64 on this problem)."""
    labels = torch.arange(100) % 2 if conditional else None
    tol = 1e-4
    min_entries = 40 if machine == "ls" else 1000  # LS: one group (index) per pixel, 50 or 100 entries
    if machine == "ls":  # an index per pixel: the central 8 x 8 (64 indexes, not 256) checks the same
        digits = digits[:, :, 4:12, 4:12].contiguous()
    exact = elsfast.ScoreMachine(
        digits[:100], labels, machine=machine, padding=padding, backend="torch", dtype=torch.float64
    )
    backend = TopK(k=64, tolerance=tol, nlist=16, nprobe=4, min_entries=min_entries, cache_dir="", progress=False)
    approx = {
        dtype: elsfast.ScoreMachine(
            digits[:100], labels, machine=machine, padding=padding, backend=backend, dtype=dtype
        )
        for dtype in (torch.float64, torch.float32)
    }
    call_labels = torch.tensor([0, 1, 1]) if conditional else None
    used = 0
    for abar in (0.3, 0.9, 0.9995):
        x = noisy(digits[100:103], abar)
        want = exact.denoise(x, abar, 3, call_labels)
        for dtype, m in approx.items():
            got = m.denoise(x.to(dtype), abar, 3, call_labels).double()
            stats = m.last_stats
            assert stats.max_neglected <= tol
            rounding = 1e-9 if dtype == torch.float64 else fp32_tolerance(x, digits.double() / 127.5 - 1, abar, 3, "ls")
            assert (got - want).abs().max() <= 2 * tol + rounding, (abar, dtype)
            used += stats.approximate_queries
    assert used > 0
    assert sum(m.total_stats.approximate_queries for m in approx.values()) == used


def test_image_machine_topk(digits):
    exact = elsfast.ScoreMachine(digits[:100], machine="is", backend="torch")
    approx = elsfast.ScoreMachine(
        digits[:100], machine="is", backend=TopK(k=8, index="flat", tolerance=1e-4, min_entries=50, cache_dir="")
    )
    x = noisy(digits[100:103], 0.7).float()
    torch.testing.assert_close(approx.denoise(x, 0.7), exact.denoise(x, 0.7), atol=2e-4 + 1e-5, rtol=0)
    assert approx.last_stats.approximate_queries == 3


def test_falls_back_to_exact_at_high_noise(digits):
    backend = TopK(k=16, tolerance=1e-4, nlist=16, **SMALL)
    exact = elsfast.ScoreMachine(digits[:100])  # auto: the exact backend top-k falls back to
    approx = elsfast.ScoreMachine(digits[:100], backend=backend)
    x = noisy(digits[100:102], 0.01).float()
    torch.testing.assert_close(approx.denoise(x, 0.01), exact.denoise(x, 0.01), atol=1e-6, rtol=0)
    assert approx.last_stats.approximate_queries == 0
    assert len(backend._indexes) == 0  # the pilot predicted failure: no index was built
    assert len(backend._failed_abar) > 0  # and the noise level is remembered


def test_no_new_pilot_until_the_noise_has_halved(digits, monkeypatch):
    """A sampler lowers the noise a little at every step: after a failed pilot the group runs exactly without
    another pilot (which reads the whole group) until the noise variance 1 - abar has halved."""
    pilots = []
    original = topk_module.distinct_entries
    monkeypatch.setattr(topk_module, "distinct_entries", lambda *a, **k: pilots.append(1) or original(*a, **k))
    backend = TopK(k=16, tolerance=1e-4, nlist=16, **SMALL)
    m = elsfast.ScoreMachine(digits[:100], backend=backend)
    counts = []
    for abar in (0.01, 0.3, 0.5, 0.6):  # 1 - abar: 0.99, 0.7, 0.5 (above half of 0.99), 0.4
        m.denoise(noisy(digits[100:101], abar).float(), abar, 3)
        counts.append(len(pilots))
    assert counts[0] > 0  # one pilot per large group (interior and edges)
    assert counts[0] == counts[1] == counts[2]
    assert counts[3] == 2 * counts[0]


def test_provenance_matches_exact_where_certified(digits):
    # float64: at this noise level float32 logits of magnitude ~1e4 bits round by ~5e-4 (docs/testing.md: tolerances)
    exact = elsfast.ScoreMachine(digits[:100], backend="torch", dtype=torch.float64)
    backend = TopK(k=128, tolerance=1e-6, index="flat", **SMALL)
    approx = elsfast.ScoreMachine(digits[:100], backend=backend, dtype=torch.float64)
    x = noisy(digits[100:102], 0.9995)
    _, want = exact.denoise(x, 0.9995, return_provenance=True)
    _, got = approx.denoise(x, 0.9995, return_provenance=True)
    assert approx.last_stats.approximate_queries > 0
    torch.testing.assert_close(got.weight, want.weight, atol=1e-6, rtol=0)  # the certified tolerance
    certain = want.weight > 0.6  # a clear winner: the same dominant patch
    assert certain.any()
    assert torch.equal(got.source_image[certain], want.source_image[certain])
    assert torch.equal(got.source_y[certain], want.source_y[certain])
    assert torch.equal(got.source_x[certain], want.source_x[certain])


def test_hnsw_reports_no_bound(digits):
    with pytest.raises(ValueError, match="no certified bound"):
        TopK(index="hnsw")
    m = elsfast.ScoreMachine(digits[:100], backend=TopK(k=16, index="hnsw", tolerance=None, **SMALL))
    m.denoise(noisy(digits[100:101], 0.9).float(), 0.9)
    assert math.isnan(m.last_stats.max_neglected)


def test_cache_is_reused_invalidated_and_checked(digits, tmp_path, monkeypatch):
    def machine(images, backend_dir=tmp_path):
        return elsfast.ScoreMachine(images, backend=TopK(k=16, tolerance=None, nlist=16, min_entries=5000,
                                                         cache_dir=str(backend_dir), progress=False))  # fmt: skip

    x = noisy(digits[100:101], 0.9).float()
    first = machine(digits[:100]).denoise(x, 0.9)
    files = sorted(tmp_path.glob("*.faissidx"))
    assert len(files) == 1  # one large group (the interior border class); the others run exactly

    # a fresh backend loads the file instead of building
    real_build = topk_index_module.build_group_index
    monkeypatch.setattr(topk_index_module, "build_group_index", lambda *a, **k: pytest.fail("rebuilt"))
    torch.testing.assert_close(machine(digits[:100]).denoise(x, 0.9), first, atol=0, rtol=0)
    monkeypatch.setattr(topk_index_module, "build_group_index", real_build)

    # other data or another patch size: another index
    changed = digits[:100].clone()
    changed[0, 0, 8, 8] ^= 1
    machine(changed).denoise(x, 0.9)
    assert len(list(tmp_path.glob("*.faissidx"))) == 2
    machine(digits[:100]).denoise(x, 0.9, patch_size=5)
    assert len(list(tmp_path.glob("*.faissidx"))) == 3

    # a corrupted file is detected, reported and rebuilt, never used
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="unusable"):
        again = machine(digits[:100]).denoise(x, 0.9)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    machine(digits[:100]).denoise(x, 0.9)  # the rebuilt file is good again: no warning
    files[0].write_bytes(b"")
    with pytest.warns(UserWarning, match="unusable"):
        machine(digits[:100]).denoise(x, 0.9)


def test_options_and_errors(digits, monkeypatch):
    with pytest.raises(ValueError, match="k must be"):
        TopK(k=0)
    with pytest.raises(ValueError, match="tolerance"):
        TopK(tolerance=2.0)
    with pytest.raises(ValueError, match="index must be"):
        TopK(index="lsh")
    floats = digits[:10].float() / 127.5 - 1
    with pytest.raises(BackendUnavailable, match="uint8"):
        elsfast.ScoreMachine(floats, backend=TopK(storage="uint8")).denoise(torch.zeros(1, 1, 16, 16), 0.5)
    monkeypatch.setattr("elsfast.reduce.topk.faiss_or_reason", lambda: (None, "faiss is not installed (test)"))
    with pytest.raises(BackendUnavailable, match="faiss is not installed"):
        elsfast.ScoreMachine(digits[:10], backend="topk").denoise(torch.zeros(1, 1, 16, 16), 0.5)
    assert faiss_or_reason()[0] is not None


def test_auto_never_runs_topk_which_runs_only_when_named(digits, monkeypatch):
    """Exact unless asked: `auto` runs an exact backend even on a dictionary top-k could certify, with faiss
    installed and a `topk` registered that would accept every group; named, top-k answers and says so."""
    positions = elsfast.reduce.patches.group_sets(16, 16, 3, "zeros", "els")[0]
    dictionary = PatchDictionary(digits[:100], 3, "zeros", positions)
    x = elsfast.reduce.patches.extract_patches(noisy(digits[100:102], 0.999).float(), 3, "zeros", positions)
    x = x.reshape(1, -1, 9)
    eager = TopK(k=128, nlist=16, **{**SMALL, "min_entries": 1})
    monkeypatch.setitem(_REGISTRY, "topk", eager)
    r = softmax_reduce(x, dictionary, abar=0.999)
    assert r.backend in ("cpu", "torch")
    assert r.approximate_queries == 0 and r.neglected is None and r.pairs == r.exact_pairs
    want = softmax_reduce(x, dictionary, abar=0.999, backend="torch")
    r = softmax_reduce(x, dictionary, abar=0.999, backend="topk")
    assert r.approximate_queries > 0 and r.backend.startswith("topk") and r.pairs < r.exact_pairs
    assert float(r.neglected.max()) <= 1e-4
    torch.testing.assert_close(r.values, want.values, atol=2e-4 + 1e-5, rtol=0)


def test_config_round_trip(digits, tmp_path):
    backend = TopK(k=48, tolerance=1e-5, index="flat", nprobe=7, cache_dir=str(tmp_path))
    m = elsfast.ScoreMachine(digits[:20], backend=backend)
    m.save_pretrained(tmp_path)
    back = elsfast.ScoreMachine.from_pretrained(tmp_path, train_images=digits[:20])
    assert isinstance(back.backend, TopK)
    assert back.backend.options() == backend.options()


def test_cli_topk(tmp_path, capsys, monkeypatch):
    from elsfast.cli import main

    monkeypatch.setenv("ELSFAST_CACHE", str(tmp_path / "cache"))
    argv = ["sample", "--limit", "60", "--n", "1", "--steps", "3", "--patch-size", "3", "--device", "cpu", "--quiet"]
    code = main([*argv, "--backend", "topk", "--topk", "16", "--tolerance", "1e-3", "--out", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert "top-k answered" in out
    code = main([*argv, "--topk", "16", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == 2 and "only with --backend topk" in err


def test_large_groups_are_screened_on_a_subset_before_the_pilot(digits, monkeypatch):
    """A group of many images is first screened on every n-th image; a failed screen skips the full pilot (which
    reads the whole group). At low noise the screen passes and the index is built as usual."""
    sizes = []
    original = topk_module.distinct_entries
    monkeypatch.setattr(
        topk_module, "distinct_entries", lambda dg, *a, **k: sizes.append(dg.num_images) or original(dg, *a, **k)
    )
    monkeypatch.setattr(topk_module, "PILOT_IMAGES", 10)
    backend = TopK(k=64, tolerance=1e-4, nlist=16, index="flat", **SMALL)
    m = elsfast.ScoreMachine(digits[:100], backend=backend, machine="els", padding="circular")  # one group
    m.denoise(noisy(digits[100:101], 0.01).float(), 0.01, 3)
    assert sizes == [10]  # the screen (every 10th image) failed: no full pilot, no index
    assert len(backend._indexes) == 0
    sizes.clear()
    m.denoise(noisy(digits[100:101], 0.999).float(), 0.999, 3)
    assert sizes == [10, 100]  # screen passed, full pilot on all 100 images, index built
    assert len(backend._indexes) == 1 and m.last_stats.approximate_queries > 0
