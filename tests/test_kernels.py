"""What is particular to the fused kernels (Triton, the CUDA extension's algorithm, the compiled CPU kernel):
provenance through split states, tiles, splits and threads, configuration, precision policy, the ahead-of-time GPU
compile and GPU runs. Their agreement with the float64 brute force on the common matrix of machines is
tests/test_backends.py.

On a CPU the Triton kernel runs under the interpreter (TRITON_INTERPRET=1, set in conftest.py) on small problems
with 16 x 16 tiles, so that the sizes (6 x 7 images, 8 training images) fill no tile and the dictionary is split
across several programs. Tolerance: the float32 bound of tests/test_machines.py (8 eps32 L + 1e-6), the same as
the torch path's: the kernel's logits are fp32 dot products like torch's. Tests marked `gpu` repeat the comparison
on CUDA with GPU-sized tiles and larger problems, and check the tf32 precision policy.

The CUDA extension cannot run without a GPU; its algorithm (same source, same entry order, tiles and online update;
serial instead of threads and shared memory) runs on the host through `reduce_on_host`, against the same reference.

The CPU kernel (`backend="cpu"`, csrc/cpu_reduce.cpp) runs for real: problems of 45 images fill no 256-entry tile
and no 96-query block, and the dictionary is split across work units and chunks of one tile.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from problems import COMBOS, CudaOnHost, fp32_tolerance, logit_range, make_problem, reference, stable_seed

from elsfast import Cpu, ScoreMachine, Shifts
from elsfast.reduce import Backend, BackendUnavailable, ImageDictionary, PatchDictionary, TopK, softmax_reduce
from elsfast.reduce.cuda_backend import Cuda
from elsfast.reduce.registry import backend_from_spec, backend_spec
from elsfast.reduce.triton_backend import (
    AUTO_BOUND_RATIO,
    Triton,
    bound_ratio,
    dot_precision,
    precision_tolerance,
)

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="the Triton kernels need triton (pip install elsfast[triton])"
)


def needs_interpreter(test):
    """Runs the Triton kernel on CPU tensors: needs triton and its interpreter (skipped on a GPU machine)."""
    return pytest.mark.interpreter(needs_triton(test))


SMALL = Triton(block_m=16, block_n=16, splits=3)


def _check_weights(prov, ref, tol):
    """Dominant weight and entropy against the reference. An fp32 weight is off by at most a relative `tol` (the
    float32 bound of the outputs, 8 eps32 L: a logit is off by about eps32 L); the entropy -sum p ln p then moves by
    at most tol * sum p |ln p + 1| <= tol (H + 1)."""
    np.testing.assert_allclose(prov.weight.numpy(), ref[3], rtol=0, atol=tol)
    np.testing.assert_allclose(prov.entropy.numpy(), ref[4], rtol=0, atol=tol * (1 + ref[4].max()))


@needs_interpreter
@pytest.mark.parametrize(("machine", "padding"), COMBOS)
def test_triton_provenance_matchesreference(machine, padding):
    g = torch.Generator().manual_seed(stable_seed("triton-prov", machine, padding))
    train = torch.rand(6, 2, 5, 6, generator=g) * 2 - 1
    x = torch.randn(2, 2, 5, 6, generator=g)
    m = ScoreMachine(train, machine=machine, padding=padding, backend=SMALL)
    out, prov = m.denoise(x, 0.6, 3, return_provenance=True)
    ref = reference(x, train, 0.6, machine, padding, 3, provenance=True)
    _check_weights(prov, ref, fp32_tolerance(x, train, 0.6, 3, machine))
    got = [prov.source_image, prov.source_y, prov.source_x]
    for name, a, b in zip(("image", "y", "x"), got, ref[:3], strict=True):
        np.testing.assert_array_equal(a.numpy(), b, err_msg=name)
    torch.testing.assert_close(out, m.denoise(x, 0.6, 3))  # tracking does not change the output


@needs_interpreter
def test_triton_uint8_images_and_image_ids():
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (7, 1, 6, 5), generator=g, dtype=torch.uint8)
    x = torch.randn(2, 1, 6, 5, generator=g)
    ref = reference(x, train.double() / 127.5 - 1, 0.9, "els", "zeros", 3)
    m = ScoreMachine(train, backend=SMALL)
    np.testing.assert_allclose(m.denoise(x, 0.9, 3).double().numpy(), ref, rtol=0, atol=1e-4)
    # provenance names training images by their ids
    d = PatchDictionary(train, patch_size=3, padding="zeros", positions=torch.arange(30).view(1, 30))
    ids = torch.tensor([40, 41, 42, 43, 44, 45, 46])
    q = torch.randn(1, 5, 9, generator=g)
    want = softmax_reduce(q, d, abar=0.95, backend="torch", provenance=True).best
    dd = PatchDictionary(train, patch_size=3, padding="zeros", positions=d.positions, image_ids=ids)
    got = softmax_reduce(q, dd, abar=0.95, backend=SMALL, provenance=True).best
    torch.testing.assert_close(got, ids[want // 30] * 30 + want % 30)


@needs_interpreter
def test_triton_splits_and_tiles_do_not_change_the_result():
    train, x, _, _ = make_problem(12, 10, 3, 7, 5, 2, 0.7)
    outs = [
        ScoreMachine(train, backend=Triton(block_m=bm, block_n=bn, splits=s)).denoise(x, 0.7, 3)
        for bm, bn, s in [(16, 16, 1), (16, 16, 7), (32, 64, 2), (64, 16, 100)]
    ]
    # two fp32 results, each within the fp32 bound of the exact one
    atol = 2 * fp32_tolerance(x, train, 0.7, 3, "els")
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=atol)


@needs_interpreter
def test_triton_resident_query_chunks_do_not_change_the_result():
    """Keys of several chunks (P = 7, 3 channels: D = 147, three 64-feature chunks): the queries of the leading
    chunks resident (loaded once per program), the rest reloaded every tile, or any mix, fold the chunks in the
    same order, and entry- or feature-major key gathers sum the same integers (|k|^2 < 2^24, exact in any order),
    so every variant gives the same partial states and the same provenance."""
    from elsfast.kernels.softmax_reduce import launch_config, launch_softmax_reduce
    from elsfast.reduce.partials import kernel_inputs

    g = torch.Generator().manual_seed(5)
    train = torch.randint(0, 256, (5, 3, 7, 6), generator=g, dtype=torch.uint8)
    d = PatchDictionary(train, patch_size=7, padding="zeros", positions=torch.arange(42).view(1, 42))
    q = torch.randn(1, 20, 147, generator=g)
    inputs = kernel_inputs(q, d, 0.9)
    tiles = d.entries_per_image * math.ceil(d.num_images / 16)
    outs = []
    for resident, feature_major in [(0, False), (1, False), (3, False), (0, True), (2, True), (3, True)]:
        config = launch_config(
            147, 3, is_uint8=True, provenance=True, dot_precision="fp16x2", block_m=16, block_n=16,
            fast_exp2=False, resident_chunks=resident, feature_major=feature_major,
        )  # fmt: skip
        assert config["RESIDENT_CHUNKS"] == resident and config["D_PAD"] == 3 * config["BLOCK_D"]
        outs.append(launch_softmax_reduce(*inputs, splits=2, tiles_per_split=math.ceil(tiles / 2), config=config))
    for out in outs[1:]:
        for a, b in zip(out, outs[0], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert launch_config(147, 3, is_uint8=True, provenance=False, dot_precision="fp16x2")["RESIDENT_CHUNKS"] == 3


@needs_interpreter
def test_triton_long_keys_match_torch():
    """Keys of 4 chunks or more (P = 9, 3 channels: D = 243) run entry-major gathers (feature-major ones spilled
    as a launch compiles them, issue 24) with partially or wholly resident queries by default; they agree with
    the torch backend (values, provenance)."""
    from elsfast.kernels.softmax_reduce import launch_config

    assert not launch_config(243, 3, is_uint8=True, provenance=False, dot_precision="fp16x2")["FEATURE_MAJOR"]
    g = torch.Generator().manual_seed(9)
    train = torch.randint(0, 256, (6, 3, 9, 8), generator=g, dtype=torch.uint8)
    d = PatchDictionary(train, patch_size=9, padding="zeros", positions=torch.arange(72).view(1, 72))
    q = torch.randn(1, 20, 243, generator=g) * 3
    want = softmax_reduce(q, d, abar=0.9, backend="torch", provenance=True)
    got = softmax_reduce(q, d, abar=0.9, backend=Triton(block_m=16, block_n=16, splits=3), provenance=True)
    torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.best, want.best)


@needs_interpreter
def test_triton_empty_problem():
    d = ImageDictionary(torch.rand(3, 1, 4, 4))
    r = softmax_reduce(torch.zeros(1, 0, 16), d, abar=0.5, backend=SMALL)
    assert r.values.shape == (1, 0, 16)


@needs_triton
def test_triton_named_but_unavailable_says_why(monkeypatch):
    d = ImageDictionary(torch.rand(3, 1, 4, 4))
    with pytest.raises(BackendUnavailable, match="float32"):
        softmax_reduce(torch.zeros(1, 2, 16, dtype=torch.float64), d, abar=0.5, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        softmax_reduce(torch.zeros(1, 2, 16), d, abar=0.5, backend="triton")


def test_auto_never_picks_the_interpreter():
    d = ImageDictionary(torch.rand(3, 1, 4, 4))
    assert softmax_reduce(torch.zeros(1, 2, 16), d, abar=0.5).backend == "torch"


def test_triton_configuration_round_trips():
    spec = backend_spec(Triton(precision="ieee", block_n=32))
    assert backend_from_spec(json.loads(json.dumps(spec))) == Triton(precision="ieee", block_n=32)
    with pytest.raises(ValueError, match="power of two"):
        Triton(block_m=24)
    with pytest.raises(ValueError, match="precision"):
        Triton(precision="bf16")


COMPILE_FOR_GPUS = """

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from elsfast.kernels import softmax_reduce as k

variants = [  # (key dimension, value channels, uint8 images, provenance, distance precision, SM)
    (27, 3, True, True, "fp16x2", 90), (363, 3, True, False, "fp16x2", 90), (48, 16, False, False, "tf32", 90),
    (147, 3, True, False, "ieee", 80), (363, 1, False, True, "tf32x3", 80),
]
for D, E, uint8, provenance, precision, sm in variants:
    config = k.launch_config(D, E, is_uint8=uint8, provenance=provenance, dot_precision=precision)
    options = {name: config.pop(name) for name in ("num_warps", "num_stages")}
    signature = dict(k.KERNEL_SIGNATURE, **dict.fromkeys(config, "constexpr"))
    if uint8:
        signature["img_ptr"] = "*u8"
    out = triton.compile(ASTSource(k.softmax_reduce_kernel, signature, config), target=GPUTarget("cuda", sm, 32),
                         options=options)
    assert len(out.asm["cubin"]) > 0
    print("sm", sm, D, E, uint8, provenance, precision, "compiled; shared memory", out.metadata.shared)
"""


@needs_triton
@pytest.mark.aot
def test_triton_kernel_compiles_for_gpus():
    """The interpreter does not check what only a GPU compile does (tl.dot shapes, types, precisions): compile the
    kernel to sm_80 and sm_90 cubins ahead of time, without a GPU, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_GPUS], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 5


def test_precision_policy_never_takes_a_bound_10x_looser_than_the_cpu_kernel():
    assert dot_precision(uint8=True) == "fp16x2"  # integer keys: two exact fp16 passes
    assert dot_precision(uint8=False) == "tf32x3"  # tf32 only when asked for
    assert dot_precision("ieee", uint8=False) == "ieee"
    assert dot_precision("tf32") == "tf32"
    cpu = Cpu().accuracy(torch.float32)
    # every key dimension of P = 1 .. 17 with 1 or 3 channels, and whole images (IS/ES)
    for D in [C * P * P for C in (1, 3) for P in range(1, 18, 2)] + [784, 3072]:
        for uint8 in (True, False):
            auto = Triton().accuracy(torch.float32)
            assert bound_ratio(precision_tolerance(dot_precision(uint8=uint8)), cpu, D) <= AUTO_BOUND_RATIO
            assert bound_ratio(auto, cpu, D) <= AUTO_BOUND_RATIO
        assert bound_ratio(Cuda().accuracy(torch.float32), cpu, D) <= AUTO_BOUND_RATIO
    # the precisions auto does not take are looser than that
    assert bound_ratio(precision_tolerance("tf32"), cpu, 27) > AUTO_BOUND_RATIO


def test_pixel_offsets_rebuild_every_dictionary():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 2, 5, 6, generator=g) * 2 - 1
    dictionaries = [ImageDictionary(images), ImageDictionary(images, shifts=True)]
    for padding in ("zeros", "circular"):
        for positions in (torch.arange(30).view(30, 1), torch.arange(30).view(1, 30), torch.tensor([[0, 5], [7, 8]])):
            dictionaries.append(PatchDictionary(images, patch_size=5, padding=padding, positions=positions))
    for d in dictionaries:
        keys, values = d.entries(0, 3, torch.float64)
        key_offsets, value_offsets = d.pixel_offsets()
        S = d.entries_per_image
        flat = images.double().reshape(3, -1)
        n = torch.arange(3).repeat(S)  # entry-major order: entry s of image i at s * 3 + i
        s = torch.arange(S).repeat_interleave(3)
        ko = key_offsets[:, s]  # (G, S*3, D)
        rebuilt = torch.where(ko >= 0, flat[n.view(1, -1, 1), ko.clamp(min=0)], 0.0)
        torch.testing.assert_close(rebuilt, keys, rtol=0, atol=0)
        torch.testing.assert_close(flat[n.view(1, -1, 1), value_offsets[:, s]], values, rtol=0, atol=0)


# --- the CUDA source's algorithm, run on the host --------------------------------------------------------------


@pytest.fixture
def cuda_ext():
    return pytest.importorskip("elsfast._cuda", reason="the CUDA extension is not compiled (no nvcc at install)")


def test_cuda_backend_says_why_it_cannot_run(cuda_ext):
    d = ImageDictionary(torch.rand(3, 1, 4, 4))
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors") as info:
        softmax_reduce(torch.zeros(1, 2, 16), d, abar=0.5, backend="cuda")
    assert "at most 4" in str(info.value)  # whole-image values


def kernel_tensors(sums: torch.dtype, E: int = 1) -> dict[str, torch.Tensor]:
    """Valid tensor arguments of both extensions' `reduce`: G = 1, M = 2, D = 9, N = 3, S = 4, K = 2 splits."""
    G, M, D, N, S, K = 1, 2, 9, 3, 4, 2
    return {
        "q": torch.zeros(G, M, D),
        "images": torch.zeros(N, 16),
        "key_offsets": torch.zeros(G, S, D, dtype=torch.int32),
        "value_offsets": torch.zeros(G, S, E, dtype=torch.int32),
        "m": torch.empty(K, G, M),
        "l": torch.empty(K, G, M, dtype=sums),
        "acc": torch.empty(K, G, M, E, dtype=sums),
        "best": torch.empty(K, G, M, dtype=torch.int64),
        "u": torch.empty(K, G, M, dtype=sums),
    }


def bad_kernel_tensors(sums: torch.dtype) -> list[tuple[dict[str, torch.Tensor], str]]:
    """Tensor arguments each wrong in one way, and what the extension's error must say."""
    good = kernel_tensors(sums)
    other_sums = torch.float32 if sums == torch.float64 else torch.float64
    swapped = {"key_offsets": good["value_offsets"], "value_offsets": good["key_offsets"]}
    return [
        ({**good, **swapped}, "key_offsets has shape"),
        ({**good, "q": good["q"].double()}, "q must be float32"),
        ({**good, "l": good["l"].to(other_sums)}, f"l must be {str(sums)[6:]}"),
        ({**good, "q": torch.zeros(1, 9, 2).transpose(1, 2)}, "q must be contiguous"),
        ({**good, "images": torch.zeros(3, 16, dtype=torch.int32)}, "images must be uint8 or float32"),
        ({**good, "best": 0}, "best must be a torch.Tensor"),
        (kernel_tensors(sums, E=5), "E = 5 must be in"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_cuda_extension_checks_every_tensor(cuda_ext, case):
    """The extension reads sizes off the tensors and refuses a wrong dtype, shape, layout or type by name."""
    tensors, message = bad_kernel_tensors(torch.float64)[case]
    scalars = {"key_scale": 1.0, "provenance": False, "entries_per_split": 32, "stream": 0, "host": True}
    with pytest.raises(ValueError, match=message):
        cuda_ext.reduce(**tensors, **scalars)
    with pytest.raises(TypeError):  # keyword-only: positional pointers and sizes cannot be passed
        cuda_ext.reduce(*tensors.values(), 1.0, False, 32, 0, True)


# --- the compiled CPU kernel ---------------------------------------------------------------------------------


SPLIT = Cpu(splits=3, tiles_per_chunk=1)  # every tile its own chunk, three partial states a query


def cpu_variants(ext) -> list[Cpu]:
    """Every instruction set this CPU runs, with the planned splits and chunks and with SPLIT's."""
    return [Cpu(isa=isa, **kw) for isa in ext.isas() for kw in ({}, {"splits": 3, "tiles_per_chunk": 1})]


def compiled_kernels() -> list[Backend]:
    """The compiled kernels that run here: the CUDA source's algorithm on the host, the CPU kernel's variants."""
    kernels = []
    if importlib.util.find_spec("elsfast._cuda") is not None:
        kernels.append(CudaOnHost())
    if importlib.util.find_spec("elsfast._cpu") is not None:
        import elsfast._cpu as ext

        kernels += cpu_variants(ext)
    if not kernels:
        pytest.skip("no compiled kernel: neither nvcc nor a C++ compiler with OpenMP at install, or no AVX2")
    return kernels


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_compiled_kernels_provenance_uint8_and_long_keys(padding):
    # uint8 images, P = 7 with 3 channels: D = 147 spans several 32-feature CUDA chunks; dominant entry, weight and
    # entropy through the split states
    g = torch.Generator().manual_seed(6)
    train = torch.randint(0, 256, (40, 3, 8, 9), generator=g, dtype=torch.uint8)
    x = torch.randn(2, 3, 8, 9, generator=g)
    ref = reference(x, train.double() / 127.5 - 1, 0.8, "els", padding, 7, provenance=True)
    want = reference(x, train.double() / 127.5 - 1, 0.8, "els", padding, 7)
    tol = fp32_tolerance(x, train.float() / 127.5 - 1, 0.8, 7, "els")
    for backend in compiled_kernels():
        m = ScoreMachine(train, padding=padding, backend=backend)
        out, prov = m.denoise(x, 0.8, 7, return_provenance=True)
        assert np.abs(out.double().numpy() - want).max() <= tol
        _check_weights(prov, ref, tol)
        got = [prov.source_image, prov.source_y, prov.source_x]
        for name, a, b in zip(("image", "y", "x"), got, ref[:3], strict=True):
            np.testing.assert_array_equal(a.numpy(), b, err_msg=f"{backend}: {name}")
        torch.testing.assert_close(out, m.denoise(x, 0.8, 7))  # tracking does not change the output


def test_cpu_kernels_sums_stay_accurate_over_many_entries(cpu_ext):
    """450,000 entries (1,760 tiles of the cpu kernel, 32 image blocks of the shift kernel) at moderate noise: the
    running sums are kept in fp64, so the result is as close to float64 as the fp32 logits allow (in fp32 they
    drifted by 2e-5), and closer than the torch path's."""
    g = torch.Generator().manual_seed(7)
    train = torch.randint(0, 256, (500, 1, 32, 32), generator=g, dtype=torch.uint8)
    x = torch.randn(2, 1, 32, 32, generator=g)
    ref = ScoreMachine(train, backend="torch", dtype=torch.float64).denoise(x.double(), 0.3, 3)
    for backend in [kind(isa=isa) for isa in cpu_ext.isas() for kind in (Cpu, Shifts)]:
        out = ScoreMachine(train, backend=backend).denoise(x, 0.3, 3).double()
        assert (out - ref).abs().max() <= 1e-6, backend


def test_cpu_kernel_does_not_depend_on_splits_or_chunks(cpu_ext):
    train, x, _, _ = make_problem(13, 30, 3, 7, 8, 2, 0.7)
    outs = [
        ScoreMachine(train, backend=Cpu(splits=s, tiles_per_chunk=c)).denoise(x, 0.7, 3)
        for s, c in [(1, 1), (1, 100), (5, 2), (64, 3)]
    ]
    atol = 2 * fp32_tolerance(x, train, 0.7, 3, "els")
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=atol)


def test_cpu_kernel_threads_give_the_same_answer(cpu_ext):
    train, x, _, _ = make_problem(14, 30, 1, 9, 9, 4, 0.6)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 3):
            torch.set_num_threads(n)
            outs.append(ScoreMachine(train, backend=SPLIT).denoise(x, 0.6, 5))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # fixed splits: the same sums in the same order


def test_cpu_backend_is_auto_on_cpu_and_says_why_it_cannot_run(cpu_ext):
    train, x, _, _ = make_problem(15, 10, 1, 6, 6, 1, 0.5)
    m = ScoreMachine(train)
    m.denoise(x, 0.5, 3)
    assert m.last_stats.backends == {"cpu"}
    m = ScoreMachine(train, machine="is")  # whole-image values: torch
    m.denoise(x, 0.5)
    assert m.last_stats.backends == {"torch"}
    d = ImageDictionary(torch.rand(3, 1, 4, 4))
    with pytest.raises(BackendUnavailable, match="at most 4") as info:
        softmax_reduce(torch.zeros(1, 2, 16, dtype=torch.float64), d, abar=0.5, backend="cpu")
    assert "float32" in str(info.value)


def test_cpu_backend_configuration(cpu_ext):
    spec = backend_spec(Cpu(splits=4, isa="avx2"))
    assert backend_from_spec(json.loads(json.dumps(spec))) == Cpu(splits=4, isa="avx2")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            Cpu(splits=bad)
    with pytest.raises(ValueError, match="isa"):
        Cpu(isa="neon")
    if "avx512" not in cpu_ext.isas():
        d = PatchDictionary(torch.rand(3, 1, 4, 4), 3, "zeros", torch.arange(16).view(1, 16))
        with pytest.raises(BackendUnavailable, match="AVX-512"):
            softmax_reduce(torch.zeros(1, 2, 9), d, abar=0.5, backend=Cpu(isa="avx512"))


@pytest.mark.parametrize("case", range(7))
def test_cpu_extension_checks_every_tensor(cpu_ext, case):
    """As the CUDA extension (the same csrc/reduce_binding.h), with fp32 sums and the CPU kernel's options."""
    tensors, message = bad_kernel_tensors(torch.float32)[case]
    options = {"image_bias": None, "key_scale": 1.0, "provenance": False, "tiles_per_chunk": 1, "threads": 1}
    with pytest.raises(ValueError, match=message):
        cpu_ext.reduce(**tensors, **options, isa="avx2")
    if case == 0:
        with pytest.raises(ValueError, match="isa"):
            cpu_ext.reduce(**kernel_tensors(torch.float32), **options, isa="sse")
        with pytest.raises(ValueError, match="image_bias has shape"):
            cpu_ext.reduce(**kernel_tensors(torch.float32), **{**options, "image_bias": torch.zeros(4)}, isa="avx2")


def test_topk_falls_back_to_the_fastest_exact_backend(cpu_ext, monkeypatch):
    """Queries top-k cannot certify run on `auto`'s exact choice (here the CPU kernel), not always on torch."""
    pytest.importorskip("faiss")
    seen = []
    original = Cpu.reduce
    monkeypatch.setattr(Cpu, "reduce", lambda self, *a, **k: seen.append(1) or original(self, *a, **k))
    train, x, _, _ = make_problem(16, 40, 1, 8, 8, 2, 0.01)
    backend = TopK(k=8, tolerance=1e-4, min_entries=100, cache_dir="", progress=False)
    out = ScoreMachine(train, backend=backend).denoise(x, 0.01, 3)  # high noise: nothing can be certified
    assert seen
    np.testing.assert_allclose(out.double().numpy(), reference(x, train, 0.01, "els", "zeros", 3), rtol=0, atol=1e-5)


# --- GPU ---------------------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@needs_triton
@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["auto", "ieee"])
@pytest.mark.parametrize("abar", [0.01, 0.5, 0.999])
@pytest.mark.parametrize(("machine", "padding"), COMBOS)
def test_triton_gpu_matches_float64(machine, padding, abar, precision):
    train, x, _, _ = make_problem(stable_seed("triton-gpu", machine, padding, abar), 64, 3, 16, 16, 4, abar)
    exact = ScoreMachine(train.double(), machine=machine, padding=padding, dtype=torch.float64)
    want = exact.denoise(x.double(), abar, 5)
    m = ScoreMachine(train, machine=machine, padding=padding, backend=Triton(precision=precision)).to("cuda")
    out = m.denoise(x.cuda(), abar, 5).cpu()
    err = (out.double() - want).abs().max().item()
    L = logit_range(x, train, abar, 5, machine)
    assert err <= m.backend.accuracy(torch.float32).bound(torch.float32, L, train.shape[1] * 25)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("abar", [0.01, 0.5, 0.999])
@pytest.mark.parametrize(("machine", "padding"), [c for c in COMBOS if c[0] in ("ls", "els")])
@pytest.mark.parametrize("P", [3, 11])
def test_cuda_gpu_matches_float64(cuda_ext, machine, padding, abar, P):
    train, x, _, _ = make_problem(stable_seed("cuda-gpu", machine, padding, abar, P), 64, 3, 16, 16, 4, abar)
    exact = ScoreMachine(train.double(), machine=machine, padding=padding, dtype=torch.float64)
    want = exact.denoise(x.double(), abar, P)
    m = ScoreMachine(train, machine=machine, padding=padding, backend="cuda").to("cuda")
    out = m.denoise(x.cuda(), abar, P).cpu()
    assert (out.double() - want).abs().max().item() <= fp32_tolerance(x, train, abar, P, machine)
    on_host = ScoreMachine(train, machine=machine, padding=padding, backend=CudaOnHost()).denoise(x, abar, P)
    torch.testing.assert_close(out, on_host, rtol=0, atol=2 * fp32_tolerance(x, train, abar, P, machine))
