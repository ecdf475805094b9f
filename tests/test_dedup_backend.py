"""The dedup backend (`backend="dedup"`: the cpu kernel over each group's distinct keys, weighted by their counts):
its tables of distinct keys, their cache, `auto`'s rule for it, and what it refuses. Its agreement with the float64
brute force (binary images whose patches repeat, among others) is tests/test_backends.py.

Tolerance: the float32 bound of tests/test_machines.py (8 eps32 L + 1e-6), as for the other kernels; the log2
count bias adds one fp32 rounding of a logit, inside that bound. The problems repeat patches on purpose (binary
images, as MNIST's strokes on a flat background), so that every table holds keys that stand for several entries:
the tests check that they do.
"""

import math

import numpy as np
import pytest
import torch
from problems import fp32_tolerance, make_problem, reference, stable_seed

import elsfast.reduce.dedup_backend as dedup_backend
import elsfast.reduce.distinct as distinct
from elsfast import Dedup, ScoreMachine
from elsfast.reduce import BackendUnavailable, ImageDictionary, PatchDictionary, policy, softmax_reduce
from elsfast.reduce.dedup_backend import distinct_table
from elsfast.reduce.patches import extract_patches, group_sets
from elsfast.reduce.registry import backend_from_spec, backend_spec


@pytest.fixture(autouse=True)
def fresh_cache():
    dedup_backend.TABLES.clear()
    dedup_backend.COUNTS.clear()
    yield
    dedup_backend.TABLES.clear()
    dedup_backend.COUNTS.clear()


def binary_problem(seed, N, C, H, W, B, abar, classes=None, uint8=False):
    """`make_problem` with training pixels in {-1, 1} (uint8: {0, 255}), 10% of them on, the same in every channel
    (grey): patches repeat."""
    train, x, train_labels, labels = make_problem(seed, N, C, H, W, B, abar, classes)
    on = torch.rand(N, 1, H, W, generator=torch.Generator().manual_seed(seed + 1)).expand(N, C, H, W) < 0.1
    train = on.to(torch.uint8) * 255 if uint8 else on.float() * 2 - 1
    return train, x, train_labels, labels


def as_float(train: torch.Tensor) -> torch.Tensor:
    return train.double() / 127.5 - 1 if train.dtype == torch.uint8 else train


@pytest.mark.parametrize(
    ("machine", "padding", "P", "C", "uint8"),
    [
        ("els", "zeros", 1, 1, False),
        ("els", "zeros", 3, 1, True),
        ("els", "zeros", 3, 3, True),
        ("els", "circular", 3, 1, True),
        ("ls", "zeros", 3, 1, False),
        ("els", "zeros", 5, 1, True),
    ],
)
def test_tables_merge_the_entries_of_repeating_images(cpu_ext, machine, padding, P, C, uint8):
    train, _, _, _ = binary_problem(
        stable_seed("dedup", machine, padding, P, C, uint8), 60, C, 9, 7, 3, 0.5, None, uint8
    )
    # the largest group's table really merged entries
    positions = group_sets(9, 7, P, padding, machine)[0]
    table = distinct_table(PatchDictionary(train, P, padding, positions).group(0), memory_budget=1 << 20)
    assert table.duplication > (1.0 if P == 5 or machine == "ls" else 2.0)


def test_distinct_table_counts_every_entry_once(cpu_ext):
    train, _, _, _ = binary_problem(3, 50, 1, 8, 8, 1, 0.5, uint8=True)
    for positions in group_sets(8, 8, 3, "zeros", "els"):
        d = PatchDictionary(train, 3, "zeros", positions)
        for g in range(d.num_groups):
            dg = d.group(g)
            table = distinct_table(dg, memory_budget=1 << 20)
            keys, _ = dg.entries(0, dg.num_images, torch.float32)
            rows = ((keys[0][:, table.features] + 1) * 127.5).round().to(torch.uint8)
            want, counts = torch.unique(rows, dim=0, return_counts=True)
            got, order = torch.unique(table.keys, dim=0, return_inverse=True)
            assert got.shape[0] == table.keys.shape[0], "a key appears twice in the table"
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            bias = torch.empty_like(table.bias)
            bias[torch.arange(len(order))] = counts[order].double().log2().float()
            torch.testing.assert_close(table.bias, bias, rtol=0, atol=0)
            assert table.total == dg.size == int(counts.sum())
            # the value column of each key is its centre pixel
            centre = positions.shape[1] and dg.pixel_offsets()[1][0, 0, 0]
            column = int(table.value_features[0])
            assert int((dg.pixel_offsets()[0][0, 0] == centre).nonzero()[0]) == int(table.features[column])


def test_distinct_table_is_cached_and_rebuilt_when_the_images_change(cpu_ext):
    train, x, _, _ = binary_problem(5, 40, 1, 8, 8, 1, 0.5, uint8=True)
    positions = group_sets(8, 8, 3, "zeros", "els")[0]
    dg = PatchDictionary(train, 3, "zeros", positions)
    first = distinct_table(dg, memory_budget=1 << 20)
    assert distinct_table(PatchDictionary(train, 3, "zeros", positions), memory_budget=1 << 20) is first
    assert (
        distinct_table(
            PatchDictionary(train, 5, "zeros", group_sets(8, 8, 5, "zeros", "els")[0]), memory_budget=1 << 20
        )
        is not first
    )
    before = ScoreMachine(train, backend="dedup").denoise(x, 0.9, 3)
    train[:20] = 255 - train[:20]  # in place: the content hash sees the new version
    second = distinct_table(PatchDictionary(train, 3, "zeros", positions), memory_budget=1 << 20)
    assert second is not first
    after = ScoreMachine(train, backend="dedup").denoise(x, 0.9, 3)
    want = reference(x, as_float(train), 0.9, "els", "zeros", 3)
    assert np.abs(after.double().numpy() - want).max() <= fp32_tolerance(x, as_float(train).float(), 0.9, 3, "els")
    assert not torch.equal(before, after)


def test_distinct_table_cache_is_bounded(cpu_ext, monkeypatch):
    train, _, _, _ = binary_problem(8, 30, 1, 8, 8, 1, 0.5, uint8=True)
    monkeypatch.setattr(dedup_backend.TABLES, "max_bytes", 1)
    for P in (1, 3, 5):
        distinct_table(
            PatchDictionary(train, P, "zeros", group_sets(8, 8, P, "zeros", "els")[0]), memory_budget=1 << 20
        )
        assert len(dedup_backend.TABLES) == 1  # the newest table stays even when it alone exceeds the cap


def test_hash_collisions_are_caught_and_resolved_exactly(cpu_ext, monkeypatch):
    """Every row hashing alike forces the exact fallback; the table must equal the one built with real hashes."""
    train, _, _, _ = binary_problem(11, 30, 1, 8, 8, 2, 0.7, uint8=True)
    dg = PatchDictionary(train, 3, "zeros", group_sets(8, 8, 3, "zeros", "els")[0])
    honest = distinct_table(dg, memory_budget=1 << 20)
    dedup_backend.TABLES.clear()
    monkeypatch.setattr(distinct, "_row_hashes", lambda rows: torch.zeros(rows.shape[0], dtype=torch.int64))
    colliding = distinct_table(dg, memory_budget=1 << 20)
    assert colliding.keys.shape == honest.keys.shape
    ours = {tuple(k.tolist()): float(b) for k, b in zip(colliding.keys, colliding.bias, strict=True)}
    theirs = {tuple(k.tolist()): float(b) for k, b in zip(honest.keys, honest.bias, strict=True)}
    assert ours == theirs


def test_row_hashes_separate_rows_that_differ_in_any_byte():
    """Rows differing in one byte anywhere (also a word's top byte, which a plain linear hash of 64-bit words
    would fold onto 8 bits of its weight) hash apart."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (1, 49), generator=g, dtype=torch.uint8)
    rows = base.repeat(49 * 255 + 1, 1)
    for d in range(49):
        rows[1 + d * 255 : 1 + (d + 1) * 255, d] = (
            (base[0, d].int() + torch.arange(1, 256)).remainder(256).to(torch.uint8)
        )
    hashes = distinct._row_hashes(rows)
    assert len(torch.unique(hashes)) == rows.shape[0]
    assert torch.equal(distinct._row_hashes(rows.clone()), hashes)


def test_dedup_provenance_runs_the_cpu_kernel(cpu_ext):
    """With provenance the dominant entry is an entry of the training set (the cpu kernel), as the reference's."""
    train, x, _, _ = binary_problem(17, 40, 1, 8, 9, 2, 0.8, uint8=True)
    train = (
        train // 255 * torch.randint(1, 256, train.shape, generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    )
    want = reference(x, as_float(train), 0.8, "els", "zeros", 3)
    ref = reference(x, as_float(train), 0.8, "els", "zeros", 3, provenance=True)
    tol = fp32_tolerance(x, as_float(train).float(), 0.8, 3, "els")
    m = ScoreMachine(train, backend="dedup")
    out, prov = m.denoise(x, 0.8, 3, return_provenance=True)
    assert np.abs(out.double().numpy() - want).max() <= tol
    for name, a, b in zip(("image", "y", "x"), [prov.source_image, prov.source_y, prov.source_x], ref[:3], strict=True):
        np.testing.assert_array_equal(a.numpy(), b, err_msg=name)


def test_auto_deduplicates_only_where_entries_repeat(cpu_ext, monkeypatch):
    """`auto`'s dedup rule (small patches, large groups) is decided without building anything; inside `reduce`
    a group whose keys repeat too little runs on the cpu kernel, its table is dropped, its counts remembered (so
    it is never built again), and the report names the cpu kernel for it."""
    monkeypatch.setattr(policy, "DEDUP_MIN_ENTRIES", 100)
    repeating, x, _, _ = binary_problem(19, 60, 1, 9, 9, 1, 0.5, uint8=True)
    distinct_pixels = torch.randint(
        0, 256, (60, 1, 9, 9), generator=torch.Generator().manual_seed(4), dtype=torch.uint8
    )

    def problem(train, P):
        positions = group_sets(9, 9, P, "zeros", "els")[0]
        queries = extract_patches(x, P, "zeros", positions).reshape(positions.shape[0], -1, P * P)
        return queries, PatchDictionary(train, P, "zeros", positions)

    assert next(policy.auto_candidates(*problem(repeating, 3))).NAME == "dedup"
    assert not dedup_backend.TABLES, "choosing built a table"
    r = softmax_reduce(*problem(repeating, 3), abar=0.5)
    assert r.group_backends == ("dedup",) and r.pairs < r.exact_pairs
    queries, dictionary = problem(distinct_pixels, 3)
    r = softmax_reduce(queries, dictionary, abar=0.5)
    assert r.group_backends == ("cpu",) and r.pairs == r.exact_pairs
    key = dedup_backend._table_key(dictionary.group(0))
    assert key not in dedup_backend.TABLES and key in dedup_backend.COUNTS
    monkeypatch.setattr(dedup_backend, "distinct_entries", lambda *a, **k: pytest.fail("rebuilt a refused table"))
    assert softmax_reduce(queries, dictionary, abar=0.5).group_backends == ("cpu",)
    monkeypatch.undo()
    # beyond DEDUP_MAX_PATCH_SIZE, and below DEDUP_MIN_ENTRIES, auto does not take dedup
    monkeypatch.setattr(policy, "DEDUP_MIN_ENTRIES", 100)
    big_patches = softmax_reduce(*problem(repeating, policy.DEDUP_MAX_PATCH_SIZE + 2), abar=0.5)
    assert "dedup" not in big_patches.group_backends
    monkeypatch.setattr(policy, "DEDUP_MIN_ENTRIES", 10**9)
    assert "dedup" not in softmax_reduce(*problem(repeating, 3), abar=0.5).group_backends


def test_dedup_refuses_what_it_cannot_run(cpu_ext):
    train, x, _, _ = binary_problem(23, 10, 1, 6, 6, 1, 0.5)
    images = ImageDictionary(train)
    with pytest.raises(BackendUnavailable, match="needs a patch dictionary"):
        softmax_reduce(x.reshape(1, 1, -1), images, abar=0.5, backend="dedup")
    positions = group_sets(6, 6, 3, "zeros", "els")[0]
    queries = extract_patches(x, 3, "zeros", positions).reshape(1, -1, 9)
    with pytest.raises(BackendUnavailable, match="float32"):
        softmax_reduce(queries.double(), PatchDictionary(train, 3, "zeros", positions), abar=0.5, backend="dedup")
    with pytest.raises(BackendUnavailable, match="uint8 or float32"):
        softmax_reduce(queries, PatchDictionary(train.half(), 3, "zeros", positions), abar=0.5, backend="dedup")


def test_dedup_configuration_round_trip():
    backend = Dedup(splits=4, tiles_per_chunk=2, isa="avx2")
    spec = backend_spec(backend)
    assert spec == {"name": "dedup", "splits": 4, "tiles_per_chunk": 2, "isa": "avx2", "min_duplication": None}
    assert backend_from_spec(spec) == backend
    for bad in ({"splits": 0}, {"tiles_per_chunk": 1.5}, {"isa": "sse"}, {"min_duplication": 0.5}):
        with pytest.raises(ValueError):
            Dedup(**bad)


def test_dedup_agrees_with_the_cpu_kernel_on_repeated_natural_patches(cpu_ext):
    """A larger problem with MNIST-like statistics (flat background, strokes): dedup against the cpu kernel, which
    runs every entry, within twice the fp32 bound (both are fp32 kernels)."""
    g = torch.Generator().manual_seed(29)
    strokes = torch.rand(300, 1, 12, 12, generator=g) < 0.15
    train = (strokes * torch.randint(128, 256, strokes.shape, generator=g)).to(torch.uint8)
    x = torch.randn(2, 1, 12, 12, generator=g)
    tol = 2 * fp32_tolerance(x, as_float(train).float(), 0.95, 5, "els")
    for abar in (0.05, 0.95):
        got = ScoreMachine(train, backend="dedup").denoise(x, abar, 5)
        want = ScoreMachine(train, backend="cpu").denoise(x, abar, 5)
        assert math.isfinite(float(got.abs().max()))
        torch.testing.assert_close(got, want, rtol=0, atol=tol)
