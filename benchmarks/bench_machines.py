"""Throughput of one machine evaluation on the CPU with the torch path (issue #2 target: under 5 s and 1 GB), against
the plain `scaled_dot_product_attention` formulation of the same reduction. The compiled CPU kernel is measured
against the torch path in bench_cpu.py. Sizes from the environment (defaults in brackets): ELSFAST_BENCH_N training
images [1000], ELSFAST_BENCH_BATCH noisy images [8], ELSFAST_BENCH_ROUNDS timed rounds [3].

Run:  pytest benchmarks/bench_machines.py -m benchmark --benchmark-only --benchmark-enable \
          --benchmark-json=benchmarks/results/cpu-machines.json
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from formulations import sdpa_denoise

from elsfast import ScoreMachine

pytestmark = pytest.mark.benchmark

ABAR = 0.5
N = int(os.environ.get("ELSFAST_BENCH_N", 1000))
BATCH = int(os.environ.get("ELSFAST_BENCH_BATCH", 8))
ROUNDS = int(os.environ.get("ELSFAST_BENCH_ROUNDS", 3))


def _problem(N=N, B=BATCH, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, 1, size, size, generator=g) * 2 - 1, torch.randn(B, 1, size, size, generator=g)


def _peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of a fresh process doing one evaluation, and of one that only imports elsfast.

    Read from VmHWM in /proc/self/status: `ru_maxrss` survives exec and would report this process's peak."""
    hwm = "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024)"
    code = (
        "import torch, elsfast; torch.manual_seed(0);"
        f"t = torch.rand({N}, 1, 28, 28) * 2 - 1; x = torch.randn({BATCH}, 1, 28, 28);"
        f"elsfast.ScoreMachine(t, machine='els', padding='zeros', backend='torch').denoise(x, {ABAR}, 5);" + hwm
    )
    baseline = "import torch, elsfast;" + hwm

    def run(c: str) -> float:
        return float(subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, check=True).stdout)

    return run(code), run(baseline)


@pytest.mark.parametrize("machine", ["els", "ls"])
def test_random1000_p5_zeros(benchmark, machine):
    """1,000 random 28x28 one-channel training images, batch 8, P = 5, zero padding (issue #2)."""
    benchmark.group = f"random1000-{machine}-p5"
    train, x = _problem()
    m = ScoreMachine(train, machine=machine, padding="zeros", backend="torch")
    out = m.denoise(x, ABAR, 5)
    pairs = m.last_stats.exact_pairs
    benchmark.pedantic(m.denoise, args=(x, ABAR, 5), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(pairs=pairs, pairs_per_s=pairs / seconds)
    if machine == "els":
        # SDPA runs after the timed rounds: its large allocations would otherwise slow the rounds down
        peak, base = _peak_rss_mb()
        start = time.perf_counter()
        ref = sdpa_denoise(m, x, ABAR, 5)
        seconds_sdpa = time.perf_counter() - start
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
        benchmark.extra_info.update(
            sdpa_seconds=seconds_sdpa,
            speedup_vs_sdpa=seconds_sdpa / seconds,
            peak_rss_mb=peak,
            import_rss_mb=base,
        )


def test_mnist1000_els_p5(benchmark):
    """The same evaluation on the first 1,000 real MNIST digits (many near-identical background patches)."""
    root = Path(os.environ.get("ELSFAST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not (root / "mnist").is_dir():
        pytest.skip(f"MNIST not found under {root} (set ELSFAST_DATA)")
    from elsfast import datasets

    data = datasets.load("mnist", root=root, limit=N)
    benchmark.group = "mnist1000-els-p5"
    m = ScoreMachine(data.images, machine="els", padding="zeros", backend="torch")
    x = math.sqrt(ABAR) * (data.images[:BATCH].float() / 127.5 - 1) + math.sqrt(1 - ABAR) * _problem()[1]
    m.denoise(x, ABAR, 5)
    benchmark.pedantic(m.denoise, args=(x, ABAR, 5), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        pairs=m.last_stats.exact_pairs, pairs_per_s=m.last_stats.exact_pairs / benchmark.stats.stats.median
    )


if __name__ == "__main__":
    print(json.dumps(dict(zip(("peak_rss_mb", "import_rss_mb"), _peak_rss_mb(), strict=True))))
