"""Compile, before the tests and benchmarks of scripts/gpu_check.py, the Triton kernels they will launch (issue 24).

    python scripts/gpu_precompile.py             # on the device: the launches of the later stages, in parallel
    python scripts/gpu_precompile.py --tiny      # the rehearsal: tiny launches on CPU tensors (TRITON_INTERPRET=1)

Triton compiles a kernel on its first launch with a new key: the compile-time arguments (D, E, tiles, warps,
precision, provenance, uint8 images, ...) and the specialisation of the integer arguments (equal to 1, divisible
by 16) and pointers (16-byte aligned). Each case below makes the launch a later stage makes, with the same shapes
where they are cheap on a GPU (the full-size accuracy cases, the benchmark's ELS evaluations, which `Triton(tune=
True)` times over its whole tuning space, tests/test_kernels.py's `test_triton_gpu_matches_float64` problems) and
with fewer training images of the same divisibility where not (the benchmark's sample), so that the kernels land
in Triton's cache (`TRITON_CACHE_DIR`, set by gpu_check.py) and the later stages load them. gpu_check.py counts
the kernels in the cache after each stage, so a launch this script did not foresee shows up as a compile of the
stage that met it.

Cases run in `--workers` processes (compiles are CPU work: the device has 16 cores), the tuned ones in one process
(tuning writes its choice to elsfast's disk cache), started first. The conformance suite's Triton cases (many small
configurations) are not foreseen: their compiles are counted in the kernel-tests stage. Each case prints one
`PRECOMPILE {json}` line: name, seconds, and the error if it failed. Exit status 1 when a case failed.

Under the interpreter (`--tiny`) nothing is compiled: the cases run the launcher, the split planning and the tuning
code on CPU tensors, which is what the rehearsal checks before the device meets them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

# the later stages' sizes, as scripts/gpu_check.py passes them (environment variables of benchmarks/bench_kernels.py)
BENCH_N = int(os.environ.get("ELSFAST_BENCH_N", 50000))
BENCH_BATCH = int(os.environ.get("ELSFAST_BENCH_BATCH", 64))
BENCH_P = [int(p) for p in os.environ.get("ELSFAST_BENCH_P", "3,11").split(",")]
BENCH_SAMPLES = int(os.environ.get("ELSFAST_BENCH_SAMPLES", 10))
BENCH_STEPS = int(os.environ.get("ELSFAST_BENCH_STEPS", 20))
SAMPLE_IMAGES = 1024  # the sample's dictionary here: divisible by 16 like CIFAR-10's 50,000
TESTS = Path(__file__).resolve().parents[1] / "tests"  # tests/problems.py: the tests' own problems


def cases(tiny: bool) -> list[list[tuple]]:
    """The cases, grouped by the process that runs them: (name, function name, keyword arguments)."""
    kernel_test_cases = [
        (
            f"test_triton_gpu_matches_float64 {m}-{p}-{precision}",
            "kernel_test",
            dict(machine=m, padding=p, precision=precision),
        )
        for m, p in _combos()
        for precision in ("auto", "ieee")
    ]
    if tiny:
        full = [
            (
                "full-size-like triton, 2 splits (tiny)",
                "full_size",
                dict(shape=(1, 8, 8), images=32, queries=4, splits=2),
            )
        ]
        tuned = [
            ("full-size-like triton-tuned (tiny)", "full_size", dict(shape=(1, 4, 4), images=16, queries=4, tune=True))
        ]
        return [full, tuned]  # the kernel-test launches: 30 s each in the interpreter, run by the kernel-tests stage
    full = [
        (
            f"full-size {name} triton, {splits} splits",
            "full_size",
            dict(shape=shape, images=n, queries=64, splits=splits),
        )
        for name, shape, n in (("mnist", (1, 28, 28), 60000), ("cifar10", (3, 32, 32), 50000))
        for splits in (2, 11)
    ]
    els = [
        (f"benchmark triton P={P}", "els", dict(images=BENCH_N, batch=BENCH_BATCH, P=P, tune=False)) for P in BENCH_P
    ]
    tuned = [
        (f"benchmark triton-tuned P={P}", "els", dict(images=BENCH_N, batch=BENCH_BATCH, P=P, tune=True))
        for P in BENCH_P
    ]
    sample = [("benchmark sample", "sample", dict(images=SAMPLE_IMAGES, n=BENCH_SAMPLES, steps=BENCH_STEPS))]
    # the tuned cases (one process, the longest: every candidate compiled) first, then the accuracy cases: a worker
    # takes the next group as it frees up
    return [tuned] + [[case] for case in full + els + sample + kernel_test_cases]


def _problems():
    """tests/problems.py (imported from tests/)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import problems

    return problems


def _combos() -> list[tuple[str, str]]:
    return _problems().COMBOS


def full_size(
    shape: tuple[int, int, int], images: int, queries: int, splits: int | None = None, tune: bool = False
) -> None:
    """tests/test_kernel_scale.py's gpu launch: P = 3, circular, uint8 images, every position one group; with
    `tune`, `Triton(tune=True)` on the same problem (its whole tuning space)."""
    import torch

    from elsfast.reduce import PatchDictionary, Triton, softmax_reduce

    device = _device()
    C, H, W = shape
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (images, C, H, W), dtype=torch.uint8, generator=g).to(device)
    dictionary = PatchDictionary(train, 3, "circular", torch.arange(H * W, device=device).view(1, -1))
    q = torch.randn(1, queries, dictionary.key_dim, generator=g).to(device)
    softmax_reduce(q, dictionary, abar=0.0081, backend=Triton(splits=splits, tune=tune))


def els(images: int, batch: int, P: int, tune: bool, size: int = 32) -> None:
    """benchmarks/bench_kernels.py's ELS evaluation: zero padding, abar 0.9, uint8 CIFAR-10-shaped images."""
    import torch

    from elsfast import ScoreMachine
    from elsfast.reduce import Triton

    device = _device()
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=g)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    ScoreMachine(train, backend=Triton(tune=tune)).to(device).denoise(x, 0.9, P)


def sample(images: int, n: int, steps: int) -> None:
    """benchmarks/bench_kernels.py's sample (the calibrated CIFAR-10 patch sizes), on fewer training images."""
    import torch

    import elsfast
    from elsfast import ScoreMachine

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)
    machine = ScoreMachine(train).to(_device())
    elsfast.sample(machine, n=n, steps=steps, patch_size="CIFAR10_ResNet_zeros_conditional", seed=0, progress=False)


def kernel_test(machine: str, padding: str, precision: str) -> None:
    """tests/test_kernels.py's `test_triton_gpu_matches_float64` launch (its abar changes no compile-time argument)."""
    from elsfast import ScoreMachine
    from elsfast.reduce import Triton

    device = _device()
    train, x, _, _ = _problems().make_problem(0, 64, 3, 16, 16, 4, 0.5)
    machine = ScoreMachine(train, machine=machine, padding=padding, backend=Triton(precision=precision)).to(device)
    machine.denoise(x.to(device), 0.5, 5)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_group(group: list[tuple]) -> list[dict]:
    """Run one process's cases in order; one failing does not stop the next."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        import triton_interpreter_compat  # noqa: F401 (triton 3.6's interpreter, see that module)
    done = []
    for name, function, kwargs in group:
        started = time.monotonic()
        record = {"case": name}
        try:
            globals()[function](**kwargs)
            record["status"] = "passed"
        except Exception as error:  # reported, and the stage fails
            record.update(status="failed", error=f"{type(error).__name__}: {error}"[:500])
            traceback.print_exc()
        record["seconds"] = round(time.monotonic() - started, 2)
        print("PRECOMPILE " + json.dumps(record), flush=True)
        done.append(record)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny launches for the rehearsal (CPU, interpreter)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes (default 8)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    groups = cases(args.tiny)
    workers = min(args.workers, len(groups))
    started = time.monotonic()
    if workers == 1:
        results = [run_group(group) for group in groups]
    else:  # fresh processes (no forked CUDA state); each prints its own lines
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(run_group, groups, chunksize=1)
    records = [r for group in results for r in group]
    failed = [r["case"] for r in records if r["status"] == "failed"]
    total = {
        "cases": len(records),
        "failed": failed,
        "workers": workers,
        "seconds": round(time.monotonic() - started, 1),
    }
    print("PRECOMPILE-TOTAL " + json.dumps(total), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
