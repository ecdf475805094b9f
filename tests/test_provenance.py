"""Per-pixel provenance (dominant dictionary entry, its weight, posterior entropy) against the float64 brute
force, on the paper's Fig. 3 toy and on the IS machine (issue #7)."""

import math

import numpy as np
import pytest
import torch
from problems import COMBOS, reference, stable_seed

import elsfast
from elsfast import ScoreMachine
from elsfast.reduce import PatchDictionary, ReduceState


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


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_valid_dictionary_provenance_matches_reference(padding):
    """ELS with the valid dictionary: every pixel against the patches inside the images, so an entry's id counts
    the dictionary's positions (not the query positions); the source image was decoded with the wrong count."""
    g = torch.Generator().manual_seed(stable_seed("valid provenance", padding))
    N, B, H, W = 5, 2, 6, 7
    train = torch.rand(N, 1, H, W, generator=g, dtype=torch.float64) * 2 - 1
    x = torch.randn(B, 1, H, W, generator=g, dtype=torch.float64)
    m = ScoreMachine(train, padding=padding, dictionary="valid", dtype=torch.float64)
    _, prov = m.denoise(x, 0.9, 3, return_provenance=True)
    ref = reference(x, train, 0.9, "els", padding, 3, provenance=True, dictionary="valid")
    assert len(np.unique(ref[0])) > 2  # several source images, so a wrong decoding shows
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


# Ties between identical patches (issue #17, part 4): exact, and won by the lowest id, however the dictionary is cut.


def test_fixed_order_dot_is_a_function_of_each_pair():
    """Unlike a matrix product, whose rounding depends on its shape, `fixed_order_dot` gives a row the same bits
    wherever it sits and however many rows come with it (one block or several), within its error bound."""
    from elsfast.reduce.peaks import BLOCK_ELEMENTS, fixed_order_dot

    g = torch.Generator().manual_seed(17)
    for D in (1, 2, 25, 121):
        q = torch.randn(D, generator=g, dtype=torch.float64)
        row = torch.randn(D, generator=g, dtype=torch.float64)
        dots = []
        for n, at in [(1, 0), (7, 3), (3 * BLOCK_ELEMENTS // D + 5, BLOCK_ELEMENTS // D + 1)]:
            keys = torch.randn(1, n, D, generator=g, dtype=torch.float64)
            keys[0, at] = row
            dots.append(fixed_order_dot(keys, q)[0, at])
            dots.append(fixed_order_dot(q.expand(1, n, D), keys)[0, at])
        assert all(torch.equal(d, dots[0]) for d in dots), (D, dots)
        exact = (q * row).sum().item()
        assert abs(dots[0].item() - exact) <= 8 * D * 2**-53 * (q * row).abs().sum().item()


def test_key_classes_are_exact_even_when_projections_collide(monkeypatch):
    from elsfast.reduce import peaks

    g = torch.Generator().manual_seed(5)
    keys = torch.randint(0, 3, (2, 40, 4), generator=g).double()  # many repeats
    values = keys[..., :1].clone()
    values[0, 7] = 5.0  # an entry whose value, not key, differs from its twins
    expected = [torch.unique(torch.cat([keys[i], values[i]], -1), dim=0, return_inverse=True)[1] for i in range(2)]
    for collide in (False, True):
        if collide:  # every projection equal: the classes must come from the keys themselves
            monkeypatch.setattr(peaks, "fixed_order_dot", lambda a, b: torch.zeros(a.shape[:-1], dtype=b.dtype))
        classes = peaks.key_classes(keys, values)
        for i in range(2):  # the same partition (class numbers may differ)
            pairs = torch.stack([classes[i], expected[i]], 1).unique(dim=0)
            assert len(pairs) == len(classes[i].unique()) == len(expected[i].unique()), (collide, i)


def test_exact_peak_looks_past_the_rounding_of_the_matrix_product():
    """Where the GEMM ranks two different patches within its rounding of each other, the fixed-order logits decide;
    where two entries have equal fixed-order logits, the lower id wins."""
    from elsfast.reduce.peaks import exact_peak, fixed_order_dot

    q = torch.tensor([[[0.5, -1.0, 2.0]]], dtype=torch.float64)
    keys = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.25], [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    bias = -fixed_order_dot(keys, keys) / 4
    exact = fixed_order_dot(q, keys) + bias  # entries 0 and 2 equal and largest, entry 3 next
    lowest = torch.tensor([[9, 4, 6, 1]])
    window = torch.tensor([[1e-9]], dtype=torch.float64)
    for nudge in ([0.0, 0.0, 0.0, 0.0], [-1e-12, 0.0, 3e-12, 0.0], [1e-12, 0.0, -1e-12, 0.0]):
        logits = exact.unsqueeze(1) + torch.tensor(nudge, dtype=torch.float64)  # the GEMM's rounding
        m, best = exact_peak(logits.clone(), q, keys, bias, lowest, window, floor=-1e300)
        assert m.item() == exact[0, 0].item() and best.item() == 6, nudge
    # a nearer rival: entry 3 made as large as entries 0 and 2 up to the GEMM's rounding
    bias[0, 3] += exact[0, 0] - exact[0, 3]
    exact = fixed_order_dot(q, keys) + bias
    logits = exact.unsqueeze(1).clone()
    logits[0, 0, 3] -= 1e-12
    m, best = exact_peak(logits, q, keys, bias, lowest, window, floor=-1e300)
    expected = 1 if exact[0, 3] == exact[0, 0] else (6 if exact[0, 0] > exact[0, 3] else 1)
    assert best.item() == expected and m.item() == exact[0].max().item()


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        ("torch", torch.float64),
        ("torch", torch.float32),
        ("cpu", torch.float32),
        ("cuda-host", torch.float32),
        pytest.param("triton", torch.float32, marks=pytest.mark.interpreter),
        pytest.param("cuda", torch.float32, marks=ON_GPU),
        pytest.param("triton-on-gpu", torch.float32, marks=ON_GPU),
    ],
)
@pytest.mark.parametrize("budget", [1, 512 << 20])
def test_identical_patches_name_the_lowest_id_whatever_the_order_of_image_ids(backend, dtype, budget, request):
    """Binary images (patches repeat within and across images, three images are copies of each other) with image
    ids in no particular order: every query names, among the entries whose patch equals its dominant one, the one
    with the lowest global id, on the torch path, the CPU kernel, the CUDA kernel's source run on the host and the
    Triton kernel (interpreter), in one chunk or many, with the dictionary split across programs. (Before issue
    #17, part 4, a tile named its first maximum: 4 of the 6 torch and CPU cases failed, and the CUDA and Triton
    kernels, which kept the earlier of equal maxima across tiles, failed all theirs.)"""
    from elsfast.reduce import PatchDictionary, softmax_reduce
    from elsfast.reduce.patches import extract_patches, group_sets

    backends = [backend]
    if backend == "cpu":
        from elsfast.reduce import Cpu

        # skips where the CPU kernel does not run; else every instruction set this CPU runs it with
        backends = [Cpu(isa=isa) for isa in request.getfixturevalue("cpu_ext").isas()]
    elif backend == "cuda-host":
        from problems import CudaOnHost

        pytest.importorskip("elsfast._cuda", reason="the CUDA extension is not compiled (no nvcc at install)")
        backends = [CudaOnHost()]  # three dictionary splits, 32-entry tiles that span several positions
    elif backend == "triton":
        from elsfast.reduce import Triton

        pytest.importorskip("triton", reason="triton is not installed")
        backends = [Triton(block_m=16, block_n=16, splits=3)]  # one position a tile, three splits
    elif backend == "cuda":
        from elsfast.reduce import Cuda

        backends = [Cuda()]  # as many dictionary splits as fill the GPU
    elif backend == "triton-on-gpu":
        from elsfast.reduce import Triton

        backends = [Triton(block_m=16, block_n=16, splits=3)]
    device = "cuda" if backend in ("cuda", "triton-on-gpu") else "cpu"
    g = torch.Generator().manual_seed(11)
    train = (torch.rand(7, 1, 6, 5, generator=g) > 0.6).to(torch.uint8) * 255
    train[3] = train[5] = train[0]
    ids = torch.tensor([7, 2, 9, 0, 5, 1, 3])  # image 3 (id 0) is the copy of image 0 with the lowest id
    x = (0.9**0.5 * (train[[0, 2]].to(dtype) / 127.5 - 1) + 0.1**0.5 * torch.randn(2, 1, 6, 5, generator=g)).to(dtype)
    for positions in group_sets(6, 5, 3, "zeros", "els"):
        dictionary = PatchDictionary(train.to(device), 3, "zeros", positions, image_ids=ids)
        queries = extract_patches(x, 3, "zeros", positions).reshape(positions.shape[0], -1, 9).to(device)
        keys, _ = PatchDictionary(train, 3, "zeros", positions, image_ids=ids).entries(0, len(train), torch.float64)
        entry_ids = dictionary.entry_ids(0, len(train))
        for name in backends:
            r = softmax_reduce(queries, dictionary, abar=0.9, backend=name, memory_budget=budget, provenance=True)
            for group in range(positions.shape[0]):
                for best in r.best[group].tolist():
                    named = keys[group, (entry_ids == best).nonzero().item()]
                    same = (keys[group] == named).all(-1)
                    assert entry_ids[same].min().item() == best, (name, group, best, entry_ids[same].tolist())


def test_dictionary_ids_round_trip():
    """`entry_ids_of` and `decode_ids` are inverses; `global_ids` names rows by their image ids and keeps -1;
    `entry_ids` lists the ids of `entries` in its order; `sources` gives the pixel a patch is centred on."""
    images = torch.zeros(3, 1, 4, 5)
    positions = torch.tensor([[0, 7, 19], [3, 4, 12]])
    d = PatchDictionary(images, 3, "zeros", positions, image_ids=torch.tensor([8, 2, 5]))
    image, position = torch.tensor([0, 2, 1]), torch.tensor([2, 0, 1])
    ids = d.entry_ids_of(image, position)
    assert ids.tolist() == [2, 6, 4]
    assert [t.tolist() for t in d.decode_ids(ids)] == [image.tolist(), position.tolist()]
    assert d.global_ids(torch.tensor([2, 6, 4, -1])).tolist() == [8 * 3 + 2, 5 * 3 + 0, 2 * 3 + 1, -1]
    assert d.entry_ids(0, 3).tolist() == [24, 6, 15, 25, 7, 16, 26, 8, 17]  # entry-major: s * n + i
    source_image, y, x = d.sources(torch.tensor([[2, 6], [4, 0]]))
    assert source_image.tolist() == [[0, 2], [1, 0]]
    assert y.tolist() == [[19 // 5, 0], [4 // 5, 3 // 5]] and x.tolist() == [[19 % 5, 0], [4 % 5, 3 % 5]]
