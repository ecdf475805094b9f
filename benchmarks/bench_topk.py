"""Top-k backend (issue #4) on full MNIST: one ELS evaluation (zero padding, P = 3, 32x32 padded digits, all
60,000 training images) of 16 noisy test digits at a low noise level, top-k against the exact torch path.

The exact path runs on a fixed fraction of the batch (`ELSFAST_BENCH_EXACT` images, default 1) and its time is
scaled to the batch; the largest deviation is measured on those images. The index is built (or loaded from the
cache) before timing; its build time is recorded separately. Needs the real data (`../shared/data` or
`$ELSFAST_DATA`) and faiss.

Run:  pytest benchmarks/bench_topk.py -m benchmark --benchmark-only --benchmark-enable \
          --benchmark-json=benchmarks/results/cpu-topk.json
"""

import math
import os
import resource
import time
from pathlib import Path

import pytest
import torch

import elsfast
from elsfast import ScoreMachine, TopK

pytestmark = pytest.mark.benchmark

DATA = Path(os.environ.get("ELSFAST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
N = int(os.environ.get("ELSFAST_BENCH_N", 60000))
EXACT_IMAGES = int(os.environ.get("ELSFAST_BENCH_EXACT", 1))
BATCH = 16


@pytest.fixture(scope="module")
def index_cache(tmp_path_factory) -> str:
    """One index cache for both noise levels (the indexes depend on the data and P only)."""
    return os.environ.get("ELSFAST_BENCH_CACHE", str(tmp_path_factory.mktemp("indexes")))


@pytest.mark.parametrize("abar", [0.99, 0.999])
def test_topk_full_mnist(benchmark, abar, index_cache):
    pytest.importorskip("faiss", reason="the top-k backend needs faiss")
    if not (DATA / "mnist").is_dir():
        pytest.skip(f"MNIST not found under {DATA} (set ELSFAST_DATA)")
    train = elsfast.datasets.load("mnist", root=DATA, pad_to=32, limit=N).images
    test = elsfast.datasets.load("mnist", split="test", root=DATA, pad_to=32, limit=BATCH).images
    g = torch.Generator().manual_seed(0)
    x0 = test.float() / 127.5 - 1
    x = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(x0.shape, generator=g)

    backend = TopK(min_entries=1 << 20, cache_dir=index_cache)
    topk = ScoreMachine(train, backend=backend)
    started = time.perf_counter()
    topk.denoise(x[:1], abar, 3)  # builds (or loads) the indexes of the large groups
    build_s = time.perf_counter() - started

    out = benchmark.pedantic(lambda: topk.denoise(x, abar, 3), rounds=1, iterations=1)
    stats = topk.last_stats
    topk_s = benchmark.stats.stats.median

    exact = ScoreMachine(train, backend="torch")
    started = time.perf_counter()
    want = exact.denoise(x[:EXACT_IMAGES], abar, 3)
    exact_s = (time.perf_counter() - started) * BATCH / EXACT_IMAGES

    benchmark.extra_info.update(
        {
            "train_images": len(train),
            "batch": BATCH,
            "abar": abar,
            "patch_size": 3,
            "index_build_or_load_s": build_s,
            "topk_s": topk_s,
            "exact_s_extrapolated": exact_s,
            "exact_images_measured": EXACT_IMAGES,
            "speedup": exact_s / topk_s,
            "pixels_topk": stats.approximate_queries,
            "pixels_total": stats.queries,
            "max_certified_neglected_mass": stats.max_neglected,
            "max_abs_deviation_from_exact": float((out[:EXACT_IMAGES] - want).abs().max()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )
