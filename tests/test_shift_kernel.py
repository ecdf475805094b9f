"""The displacement kernel (`backend="shifts"`, csrc/cpu_shift_kernel.inc) on zero-padded ELS, the machine it
serves: patches larger than the image, provenance hand-off, splits and threads, `auto`'s rule, refusals (also the
late one, from `reduce`). Its agreement with the float64 brute force on the common matrix is tests/test_backends.py.

Tolerance: the float32 bound of tests/test_machines.py (8 eps32 L + 1e-6), as for the other kernels: a pair's dot
product is a sum of the same fp32 products in another order (row sums, then column sums), the running sums are
fp64. Problems of 45 training images fill no 16-image (or 8-image) lane block, so the last block has empty lanes;
9 x 7 images give interior, edge and corner groups; batch 3.
"""

import numpy as np
import pytest
import torch
from problems import fp32_tolerance, make_problem, reference, stable_seed

from elsfast import ScoreMachine, Shifts
from elsfast.reduce import BackendUnavailable, ImageDictionary, PatchDictionary, policy, softmax_reduce
from elsfast.reduce.patches import extract_patches, group_sets
from elsfast.reduce.policy import SHIFTS_MIN_PATCH_SIZE
from elsfast.reduce.registry import backend_from_spec, backend_spec
from elsfast.reduce.shift_backend import group_rectangles, query_images


@pytest.mark.parametrize("abar", [0.01, 0.999])
def test_shift_kernel_patches_larger_than_the_image(cpu_ext, abar):
    """P = 13 on 9 x 7 images: every position is a border class of its own, displacements reach past the image."""
    train, x, train_labels, labels = make_problem(stable_seed("shifts", 13, abar), 45, 1, 9, 7, 3, abar, 3)
    ref = reference(x, train, abar, "els", "zeros", 13, labels, train_labels)
    for isa in cpu_ext.isas():
        m = ScoreMachine(train, train_labels, backend=Shifts(splits=3, isa=isa))
        out = m.denoise(x, abar, 13, labels)
        assert m.last_stats.backends == {"shifts"}
        err = np.abs(out.double().numpy() - ref).max()
        assert err <= fp32_tolerance(x, train, abar, 13, "els"), f"{isa}: max error {err:.3g}"


def test_shift_kernel_uint8_images_and_provenance(cpu_ext):
    """uint8 images, 3 channels, P = 7; with provenance the backend runs the cpu kernel (which tracks the dominant
    entry), and tracking does not change the output beyond the fp32 bound."""
    g = torch.Generator().manual_seed(6)
    train = torch.randint(0, 256, (40, 3, 8, 9), generator=g, dtype=torch.uint8)
    x = torch.randn(2, 3, 8, 9, generator=g)
    want = reference(x, train.double() / 127.5 - 1, 0.8, "els", "zeros", 7)
    ref = reference(x, train.double() / 127.5 - 1, 0.8, "els", "zeros", 7, provenance=True)
    tol = fp32_tolerance(x, train.float() / 127.5 - 1, 0.8, 7, "els")
    m = ScoreMachine(train, backend="shifts")
    out = m.denoise(x, 0.8, 7)
    assert np.abs(out.double().numpy() - want).max() <= tol
    tracked, prov = m.denoise(x, 0.8, 7, return_provenance=True)
    assert m.last_stats.backends == {"cpu"}  # the hand-off is reported
    assert np.abs(tracked.double().numpy() - want).max() <= tol
    for name, a, b in zip(("image", "y", "x"), [prov.source_image, prov.source_y, prov.source_x], ref[:3], strict=True):
        np.testing.assert_array_equal(a.numpy(), b, err_msg=name)


def test_shift_kernel_does_not_depend_on_splits_or_threads(cpu_ext):
    train, x, _, _ = make_problem(13, 37, 1, 9, 8, 2, 0.7)
    outs = [ScoreMachine(train, backend=Shifts(splits=s)).denoise(x, 0.7, 5) for s in (1, 2, 3, 64)]
    atol = 2 * fp32_tolerance(x, train, 0.7, 5, "els")
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=atol)
    threads = torch.get_num_threads()
    try:
        fixed = []
        for n in (1, 3):
            torch.set_num_threads(n)
            fixed.append(ScoreMachine(train, backend=Shifts(splits=3)).denoise(x, 0.7, 5))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(fixed[0], fixed[1], rtol=0, atol=0)  # fixed splits: the same sums in the same order


def test_auto_takes_the_shift_kernel_for_large_zero_padded_patches(cpu_ext):
    """Zero-padded ELS from SHIFTS_MIN_PATCH_SIZE on: the interior and edge groups on the shift kernel, the corner
    groups (one position each, nothing shared) on the cpu kernel; smaller patches, circular padding and LS on cpu."""
    train, x, _, _ = make_problem(15, 20, 1, 12, 12, 1, 0.5)
    for P, padding, machine, want in [
        (SHIFTS_MIN_PATCH_SIZE, "zeros", "els", {"shifts", "cpu"}),
        (SHIFTS_MIN_PATCH_SIZE - 2, "zeros", "els", {"cpu"}),
        (SHIFTS_MIN_PATCH_SIZE, "circular", "els", {"cpu"}),
        (SHIFTS_MIN_PATCH_SIZE, "zeros", "ls", {"cpu"}),
    ]:
        m = ScoreMachine(train, machine=machine, padding=padding)
        m.denoise(x, 0.5, P)
        assert m.last_stats.backends == want, (P, padding, machine)


def test_shift_kernel_says_why_it_cannot_run(cpu_ext, monkeypatch):
    images = torch.rand(4, 1, 6, 6) * 2 - 1
    x = torch.rand(2, 1, 6, 6) * 2 - 1
    positions = group_sets(6, 6, 3, "zeros", "els")[0]  # the four edge groups of 4 positions
    d = PatchDictionary(images, 3, "zeros", positions)
    queries = extract_patches(x, 3, "zeros", positions).reshape(positions.shape[0], -1, 9)
    named = softmax_reduce(queries, d, abar=0.5, backend="shifts")
    assert named.backend == "shifts"
    torch.testing.assert_close(named.values, softmax_reduce(queries, d, abar=0.5, backend="torch").values)
    with pytest.raises(BackendUnavailable, match="whole images"):
        softmax_reduce(queries[:, :5], d, abar=0.5, backend="shifts")
    # the same number of queries, not the patches of whole images: found only while reducing (a late refusal),
    # before any work; named it raises, under auto the next rule (the cpu kernel) runs
    shuffled = queries[:, torch.randperm(queries.shape[1], generator=torch.Generator().manual_seed(0))]
    assert not Shifts().unsupported_reasons(shuffled, d)
    with pytest.raises(BackendUnavailable, match="not the patches of whole images") as late:
        softmax_reduce(shuffled, d, abar=0.5, backend="shifts")
    assert late.value.reasons and late.value.reasons[0].startswith(Shifts.LIMITS["whole_images"])
    monkeypatch.setattr(policy, "SHIFTS_MIN_PATCH_SIZE", 3)
    assert next(policy.auto_candidates(shuffled, d)).NAME == "shifts"  # tried first, refuses late
    r = softmax_reduce(shuffled, d, abar=0.5)
    assert r.backend == "cpu"
    torch.testing.assert_close(r.values, softmax_reduce(shuffled, d, abar=0.5, backend="torch").values)
    circular = PatchDictionary(images, 3, "circular", torch.arange(36).view(1, 36))
    with pytest.raises(BackendUnavailable, match="zero-padded"):
        softmax_reduce(torch.zeros(1, 36, 9), circular, abar=0.5, backend="shifts")
    scattered = PatchDictionary(images, 3, "zeros", torch.tensor([[0, 7, 14]]))
    with pytest.raises(BackendUnavailable, match="rectangle"):
        softmax_reduce(torch.zeros(1, 3, 9), scattered, abar=0.5, backend="shifts")
    with pytest.raises(BackendUnavailable, match="zero-padded patch dictionary"):
        softmax_reduce(torch.zeros(1, 2, 36), ImageDictionary(images), abar=0.5, backend="shifts")
    with pytest.raises(BackendUnavailable, match="float32"):
        softmax_reduce(queries.double(), d, abar=0.5, backend="shifts")


def test_group_rectangles_and_query_images_rebuild_the_machines_layout(cpu_ext):
    H, W, P = 9, 7, 5
    x = torch.rand(3, 2, H, W) * 2 - 1
    for positions in group_sets(H, W, P, "zeros", "els"):
        d = PatchDictionary(torch.rand(1, 2, H, W), P, "zeros", positions)
        rect = group_rectangles(d)
        for g, (y0, rows, x0, cols) in enumerate(rect.tolist()):
            ys, xs = positions[g] // W, positions[g] % W
            assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (y0, y0 + rows, x0, x0 + cols)
        q = extract_patches(x, P, "zeros", positions).reshape(positions.shape[0], -1, 2 * P * P)
        images = query_images(q, d)
        r = P // 2
        rebuilt = extract_patches(images[:, :, r : r + H, r : r + W], P, "zeros", positions)
        torch.testing.assert_close(rebuilt.reshape(q.shape), q, rtol=0, atol=0)
        assert images[:, :, :r].abs().max() == 0 and images[:, :, :, :r].abs().max() == 0  # padding stays zero


def test_shift_backend_configuration_and_extension_checks(cpu_ext):
    spec = backend_spec(Shifts(splits=4, isa="avx2"))
    assert backend_from_spec(spec) == Shifts(splits=4, isa="avx2")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            Shifts(splits=bad)
    with pytest.raises(ValueError, match="isa"):
        Shifts(isa="neon")
    B, C, H, W, N, G, M, K, P = 1, 1, 4, 4, 2, 1, 16, 2, 3
    tensors = {
        "x": torch.zeros(B, C, H + P - 1, W + P - 1),
        "images": torch.zeros(N, C, H, W),
        "groups": torch.tensor([[0, 4, 0, 4]], dtype=torch.int32),
        "m": torch.empty(K, G, M),
        "l": torch.empty(K, G, M),
        "acc": torch.empty(K, G, M, C),
    }
    options = {"q_scale": 1.0, "key_scale": 1.0, "threads": 1}
    with pytest.raises(ValueError, match="odd"):
        cpu_ext.reduce_shifts(**tensors, patch_size=2, **options, isa="avx2")
    with pytest.raises(ValueError, match="zero-padded"):
        cpu_ext.reduce_shifts(**tensors, patch_size=5, **options, isa="avx2")
    with pytest.raises(ValueError, match="images has shape"):  # channels differ from the queries'
        cpu_ext.reduce_shifts(**{**tensors, "images": torch.zeros(N, 3, H, W)}, patch_size=P, **options, isa="avx2")
    with pytest.raises(ValueError, match="R = 3 must be in"):
        groups = torch.zeros(1, 3, dtype=torch.int32)
        cpu_ext.reduce_shifts(**{**tensors, "groups": groups}, patch_size=P, **options, isa="avx2")
    with pytest.raises(ValueError, match="isa"):
        cpu_ext.reduce_shifts(**tensors, patch_size=P, **options, isa="sse")
    assert cpu_ext.lanes("avx2") == 8 and cpu_ext.lanes("avx512") == 16
