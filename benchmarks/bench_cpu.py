"""The compiled CPU kernels against the torch path: one ELS evaluation (zero padding) of 2 noisy digits against
1,000 MNIST training digits padded to 32x32.

- `test_cpu_kernel_vs_torch`: the dot-product kernel (`backend="cpu"`, csrc/cpu_kernel.inc) at P = 3, 7, 11, 15,
  for every instruction set the CPU runs it with, against the torch path.
- `test_shift_kernel_vs_cpu_kernel`: the displacement kernel (`backend="shifts"`, csrc/cpu_shift_kernel.inc) at
  P = 5, 7, 9, 11, 15 against the dot-product kernel (widest ISA), measured in the same test; this sets
  `shift_backend.AUTO_MIN_PATCH_SIZE`.
- `test_dedup_vs_exact_kernels`: the dedup backend (`backend="dedup"`: the dot-product
  kernel over each group's distinct patches with log-count biases) at P = 3, 5, 7, 9 against the dot-product
  kernel, and at P = 7, 9 against the displacement kernel, on 1 noisy digit against 10,000 training digits (the
  more digits, the more patches repeat); this sets `dedup_backend.AUTO_MAX_PATCH_SIZE`. The tables are built
  before the timing; their build time and the entries per distinct key are recorded.

- `test_provenance_cost`: `denoise(..., return_provenance=True)` against `denoise` on the same machine, for the
  torch path (float64, float32) and the CPU kernel, at P = 3, 5, 11, 15 (the torch path's provenance reduces each
  chunk over its distinct patches and recomputes each tile's dominant logit in a fixed order: issue 17, part 4).

Reports pairs/s, the ratios, and the largest deviation of each from a float64 evaluation.

Uses real MNIST (`../shared/data` or `$ELSFAST_DATA`) when present, else 1,000 random images (recorded in the
result as `data`). Sizes from the environment (defaults in brackets): ELSFAST_BENCH_N training digits [1000],
ELSFAST_BENCH_BATCH noisy digits [2], ELSFAST_BENCH_DEDUP_N training digits of the dedup test [10000],
ELSFAST_BENCH_ROUNDS timed rounds [3]; a smoke run: `ELSFAST_BENCH_N=50 ELSFAST_BENCH_DEDUP_N=50
ELSFAST_BENCH_ROUNDS=1`.

Run:  pytest benchmarks/bench_cpu.py -m benchmark --benchmark-only --benchmark-enable \
          --benchmark-json=benchmarks/results/cpu-kernel.json
"""

import math
import os
import time
from pathlib import Path

import pytest
import torch

from elsfast import Cpu, ScoreMachine, Shifts, datasets
from elsfast.reduce import PatchDictionary
from elsfast.reduce.dedup_backend import distinct_table
from elsfast.reduce.patches import group_sets

pytestmark = pytest.mark.benchmark

DATA = Path(os.environ.get("ELSFAST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
ABAR = 0.5
N = int(os.environ.get("ELSFAST_BENCH_N", 1000))
BATCH = int(os.environ.get("ELSFAST_BENCH_BATCH", 2))
DEDUP_N = int(os.environ.get("ELSFAST_BENCH_DEDUP_N", 10000))
ROUNDS = int(os.environ.get("ELSFAST_BENCH_ROUNDS", 3))


def _isas() -> list[str]:
    try:
        import elsfast._cpu as ext
    except ImportError:
        return []
    return ext.isas()


def _problem(train_images: int, images: int):
    g = torch.Generator().manual_seed(0)
    if (DATA / "mnist").is_dir():
        train = datasets.load("mnist", root=DATA, pad_to=32, limit=train_images).images
        clean = datasets.load("mnist", split="test", root=DATA, pad_to=32, limit=images).images.float() / 127.5 - 1
        data = "mnist"
    else:
        train = (torch.rand(train_images, 1, 32, 32, generator=g) * 255).to(torch.uint8)
        clean = torch.rand(images, 1, 32, 32, generator=g) * 2 - 1
        data = "random"
    x = math.sqrt(ABAR) * clean + math.sqrt(1 - ABAR) * torch.randn(clean.shape, generator=g)
    return train, x, data


@pytest.fixture(scope="module")
def problem():
    return _problem(N, BATCH)


@pytest.fixture(scope="module")
def problem10k():
    return _problem(DEDUP_N, 1)


def _median_seconds(m: ScoreMachine, x: torch.Tensor, P: int) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        m.denoise(x, ABAR, P)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _measure(benchmark, problem, P, m: ScoreMachine, isa: str, baseline: str, baseline_backend) -> None:
    """Time `m` and `baseline_backend` on the problem (medians of ROUNDS, in the same test) and record pairs/s, the
    deviations from a float64 evaluation and the ratio to the baseline (its keys prefixed by `baseline`)."""
    train, x, data = problem
    exact = ScoreMachine(train, backend="torch", dtype=torch.float64).denoise(x.double(), ABAR, P)
    reference = ScoreMachine(train, backend=baseline_backend)
    reference.denoise(x, ABAR, P)  # warm-up
    baseline_s = _median_seconds(reference, x, P)
    baseline_dev = float((reference.denoise(x, ABAR, P).double() - exact).abs().max())
    out = m.denoise(x, ABAR, P)
    pairs = m.last_stats.exact_pairs
    benchmark.pedantic(m.denoise, args=(x, ABAR, P), rounds=ROUNDS, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "data": data,
            "patch_size": P,
            "isa": isa,
            "threads": torch.get_num_threads(),
            "pairs": pairs,
            "pairs_per_s": pairs / seconds,
            f"{baseline}_seconds": baseline_s,
            f"{baseline}_pairs_per_s": pairs / baseline_s,
            f"speedup_vs_{baseline}": baseline_s / seconds,
            "max_abs_deviation_from_float64": float((out.double() - exact).abs().max()),
            f"{baseline}_max_abs_deviation_from_float64": baseline_dev,
        }
    )


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("P", [3, 7, 11, 15])
def test_cpu_kernel_vs_torch(benchmark, problem, P, isa):
    if isa not in _isas():
        pytest.skip(f"the CPU kernel is not compiled or this CPU does not run {isa}")
    benchmark.group = f"mnist1000-els-p{P}"
    _measure(benchmark, problem, P, ScoreMachine(problem[0], backend=Cpu(isa=isa)), isa, "torch", "torch")


@pytest.mark.parametrize("P", [5, 7, 9, 11, 15])
def test_shift_kernel_vs_cpu_kernel(benchmark, problem, P):
    if not _isas():
        pytest.skip("the CPU kernels are not compiled or this CPU lacks AVX2 + FMA")
    benchmark.group = f"mnist1000-els-p{P}-shifts"
    _measure(benchmark, problem, P, ScoreMachine(problem[0], backend=Shifts()), _isas()[-1], "cpu_kernel", "cpu")


def _build_tables(benchmark, train: torch.Tensor, P: int) -> None:
    """Build (and cache) the dedup tables of every group the backend will run; record their build time and the
    entries per distinct key."""
    start, entries, keys = time.perf_counter(), 0, 0
    for positions in group_sets(32, 32, P, "zeros", "els"):
        dictionary = PatchDictionary(train, P, "zeros", positions)
        for g in range(dictionary.num_groups):
            table = distinct_table(dictionary.group(g), memory_budget=512 << 20)
            entries, keys = entries + table.total, keys + table.keys.shape[0]
    benchmark.extra_info.update({"table_build_s": time.perf_counter() - start, "entries_per_key": entries / keys})


@pytest.mark.parametrize(
    ("P", "baseline"), [(3, "cpu"), (5, "cpu"), (7, "cpu"), (9, "cpu"), (7, "shifts"), (9, "shifts")]
)
def test_dedup_vs_exact_kernels(benchmark, problem10k, P, baseline):
    if not _isas():
        pytest.skip("the CPU kernels are not compiled or this CPU lacks AVX2 + FMA")
    benchmark.group = f"mnist10k-els-p{P}-dedup-vs-{baseline}"
    _build_tables(benchmark, problem10k[0], P)
    m = ScoreMachine(problem10k[0], backend="dedup")
    _measure(benchmark, problem10k, P, m, _isas()[-1], f"{baseline}_kernel", baseline)


@pytest.mark.parametrize("P", [3, 5, 11, 15])
@pytest.mark.parametrize("backend", ["torch-float64", "torch-float32", "cpu-float32"])
def test_provenance_cost(benchmark, problem, P, backend):
    name, dtype = backend.split("-")
    if name == "cpu" and not _isas():
        pytest.skip("the CPU kernels are not compiled or this CPU lacks AVX2 + FMA")
    benchmark.group = f"mnist{N}-els-p{P}-provenance"
    train, x, data = problem
    dtype = getattr(torch, dtype)
    m = ScoreMachine(train, backend=name, dtype=dtype)
    x = x.to(dtype)
    m.denoise(x, ABAR, P, return_provenance=True)  # warm-up
    plain_s = _median_seconds(m, x, P)
    pairs = m.last_stats.exact_pairs
    benchmark.pedantic(m.denoise, args=(x, ABAR, P), kwargs={"return_provenance": True}, rounds=ROUNDS, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "data": data,
            "patch_size": P,
            "threads": torch.get_num_threads(),
            "pairs": pairs,
            "pairs_per_s": pairs / seconds,
            "without_provenance_seconds": plain_s,
            "provenance_over_plain": seconds / plain_s,
        }
    )
