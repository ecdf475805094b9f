"""The fused kernels on a GPU (issue #3): ELS throughput on CIFAR-10-sized problems and a full CIFAR-10 sample.

1. One ELS evaluation (zero padding, abar = 0.9) of a batch of 64 noisy 32 x 32 RGB images against all 50,000
   training images, at P = 3, 5, 11, 17, for each formulation: the elsfast backends `triton`, `triton-tuned`
   (`Triton(tune=True)`: its tiles and warps chosen by timing, the warm-up call tuning), `cuda`, `torch`, and
   `scaled_dot_product_attention` on the augmented keys of SPEC section 5 (dictionary materialised, so it runs
   on the first `SDPA_IMAGES` training images and its pairs/s are compared; keys and values zero-padded so that
   torch can use a fused kernel, the kernel that ran recorded as `sdpa_kernel`), and pykeops when it is installed
   (on as many images). The torch path is launch-bound on a GPU, so it runs on the first `TORCH_IMAGES`.
   Recorded: pairs/s (query patches x dictionary patches) and the fraction of the hardware bound of SPEC
   section 5, min(exponential-unit bound, tf32 GEMM bound at 2 D FLOPs per pair); and each formulation's largest
   deviation from a float64 evaluation on the first `REF_IMAGES` training images (the formulation run again on
   those; one float64 reference per P).
2. A `SAMPLES`-image, `STEPS`-step unconditional ELS sample against the whole training set with the calibrated
   `CIFAR10_ResNet_zeros_conditional` patch sizes, end to end.

Sizes come from the environment (defaults in brackets): ELSFAST_BENCH_N training images [50000], _BATCH [64],
_P patch sizes [3,5,11,17], _TORCH_IMAGES [N], _SDPA_IMAGES [2000], _REF_IMAGES [2000], _ROUNDS timed rounds
[3 on a GPU, 1 on the CPU], _SAMPLES [100], _STEPS [20]; each is recorded with the result. scripts/gpu_check.py
sets sizes that fit its 4-minute budget. With ELSFAST_BENCH_DEADLINE (a Unix time) set, a case that would start
after it is skipped, so a bounded run still ends cleanly and writes its JSON.

Uses the real CIFAR-10 (`../shared/data` or `$ELSFAST_DATA`) when present, else random uint8 images of the same
size (recorded as `data`). Needs a CUDA device; `ELSFAST_BENCH_DEVICE=cpu` with a small `ELSFAST_BENCH_N` runs
the same code on the CPU as a smoke test (Triton only under TRITON_INTERPRET=1).

Run:  pytest benchmarks/bench_kernels.py -m benchmark --benchmark-only --benchmark-enable \
          --benchmark-json=benchmarks/results/<gpu>-kernels.json
"""

import math
import os
import time
from pathlib import Path

import pytest
import torch
from formulations import sdpa_denoise

import elsfast
from elsfast import ScoreMachine
from elsfast.reduce import BackendUnavailable, PatchDictionary, Triton
from elsfast.reduce.partials import kernel_inputs
from elsfast.reduce.patches import extract_patches, group_sets

pytestmark = pytest.mark.benchmark

DATA = Path(os.environ.get("ELSFAST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
DEVICE = os.environ.get("ELSFAST_BENCH_DEVICE", "cuda")
N = int(os.environ.get("ELSFAST_BENCH_N", 50000))
BATCH = int(os.environ.get("ELSFAST_BENCH_BATCH", 64))
PATCH_SIZES = [int(p) for p in os.environ.get("ELSFAST_BENCH_P", "3,5,11,17").split(",")]
TORCH_IMAGES = int(os.environ.get("ELSFAST_BENCH_TORCH_IMAGES", N))
SDPA_IMAGES = int(os.environ.get("ELSFAST_BENCH_SDPA_IMAGES", 2000))
REF_IMAGES = int(os.environ.get("ELSFAST_BENCH_REF_IMAGES", 2000))
ROUNDS = int(os.environ.get("ELSFAST_BENCH_ROUNDS", 3 if DEVICE == "cuda" else 1))
SAMPLES = int(os.environ.get("ELSFAST_BENCH_SAMPLES", 100))
STEPS = int(os.environ.get("ELSFAST_BENCH_STEPS", 20))
ABAR = 0.9

# Per-SM exponential throughput (MUFU.EX2: 16 per clock per SM on Ampere/Hopper) at the boost clock, and dense tf32
# tensor-core FLOP/s, of the GPUs this project is measured on (vendor data sheets; SPEC section 5: 3.9e12 exp/s).
PEAKS = {
    "H100": {"exp_per_s": 16 * 132 * 1.83e9, "tf32_flops": 494.7e12},
    "H200": {"exp_per_s": 16 * 132 * 1.98e9, "tf32_flops": 494.7e12},
}


def _device() -> torch.device:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (ELSFAST_BENCH_DEVICE=cpu with a small ELSFAST_BENCH_N for a smoke test)")
    return torch.device(DEVICE)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture(scope="module")
def cifar() -> tuple[torch.Tensor, str]:
    _device()  # skip before decoding 50,000 images where the device is missing
    if (DATA / "cifar10").is_dir():
        return elsfast.datasets.load("cifar10", root=DATA, limit=N).images, "cifar10"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 3, 32, 32), generator=g, dtype=torch.uint8), "random uint8 (no CIFAR-10 found)"


def _bound(device: torch.device, D: int) -> dict:
    """Hardware bound in pairs/s: the exponential unit (one exp2 per pair) and the tf32 GEMM (2 D FLOPs a pair)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peaks = next((v for k, v in PEAKS.items() if k in name), None)
    if peaks is None:
        return {}
    exp, gemm = peaks["exp_per_s"], peaks["tf32_flops"] / (2 * D)
    return {"bound_exp_pairs_per_s": exp, "bound_gemm_pairs_per_s": gemm, "bound_pairs_per_s": min(exp, gemm)}


def _noisy(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x0 = images[:BATCH].float() / 127.5 - 1
    return (math.sqrt(ABAR) * x0 + math.sqrt(1 - ABAR) * torch.randn(x0.shape, generator=g)).to(device)


def _pairs(P: int, images: int) -> int:
    """Query-patch x dictionary-patch pairs of one zero-padding ELS evaluation of the batch."""
    return sum(s.shape[0] * (s.shape[1] * BATCH) * (s.shape[1] * images) for s in group_sets(32, 32, P, "zeros", "els"))


@pytest.fixture(scope="module")
def float64_reference(cifar):
    """One float64 evaluation per P on the first REF_IMAGES training images (torch backend, on the device)."""
    cache = {}

    def get(P: int, x: torch.Tensor) -> torch.Tensor:
        if P not in cache:
            images = cifar[0][:REF_IMAGES]
            exact = ScoreMachine(images, backend="torch", dtype=torch.float64).to(x.device)
            cache[P] = exact.denoise(x.double(), ABAR, P)
        return cache[P]

    return get


def _runner(formulation: str, images: torch.Tensor, x: torch.Tensor, P: int, info: dict):
    """A callable evaluating the batch with `formulation` against `images` (on x's device)."""
    backend = {"sdpa": "torch", "pykeops": "torch", "triton-tuned": Triton(tune=True)}.get(formulation, formulation)
    machine = ScoreMachine(images, backend=backend).to(x.device)
    if formulation == "sdpa":
        return lambda: sdpa_denoise(machine, x, ABAR, P, info=info)
    if formulation == "pykeops":
        return _pykeops(machine, x, P, len(images))
    return lambda: machine.denoise(x, ABAR, P)


# P varies slowest: a run bounded in time (ELSFAST_BENCH_DEADLINE) measures every formulation at the first P first
@pytest.mark.parametrize("formulation", ["triton", "triton-tuned", "cuda", "torch", "sdpa", "pykeops"])
@pytest.mark.parametrize("P", PATCH_SIZES)
def test_els_throughput(benchmark, cifar, float64_reference, formulation, P):
    device = _device()
    images, data = cifar
    x = _noisy(images, device)
    limit = {"torch": TORCH_IMAGES, "sdpa": SDPA_IMAGES, "pykeops": SDPA_IMAGES}.get(formulation, len(images))
    used = min(limit, len(images))
    sdpa: dict = {}
    run = _runner(formulation, images[:used], x, P, sdpa)
    try:
        run()  # warm-up: compilation, caches
    except BackendUnavailable as error:
        pytest.skip(str(error))
    _sync(device)

    def timed():
        out = run()
        _sync(device)
        return out

    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
    seconds = benchmark.stats.stats.median
    reference_images = min(REF_IMAGES, len(images))
    check = run if used == reference_images else _runner(formulation, images[:reference_images], x, P, {})
    deviation = float((check().double() - float64_reference(P, x)).abs().max())
    assert math.isfinite(deviation), f"{formulation} gave a non-finite result at P = {P}"
    pairs = _pairs(P, used)
    info = {
        "formulation": formulation,
        "P": P,
        "batch": BATCH,
        "train_images": used,
        "data": data,
        "abar": ABAR,
        "rounds": ROUNDS,
        "pairs": pairs,
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "reference_images": reference_images,
        "max_abs_deviation_from_float64": deviation,
        **{f"sdpa_{k}": v for k, v in sdpa.items()},
        **_bound(device, 3 * P * P),
    }
    if "bound_pairs_per_s" in info:
        info["fraction_of_bound"] = info["pairs_per_s"] / info["bound_pairs_per_s"]
    benchmark.extra_info.update(info)


def _pykeops(machine: ScoreMachine, x: torch.Tensor, P: int, images: int):
    """pykeops' `sumsoftmaxweight` reduction, one call per group, keys materialised from the first `images`
    training images (like the SDPA formulation)."""
    pykeops = pytest.importorskip("pykeops.torch", reason="pykeops is not installed")

    def run():
        B, C, H, W = x.shape
        out = torch.empty(B, C, H * W, device=x.device)
        for positions in group_sets(H, W, P, "zeros", "els"):
            q = extract_patches(x, P, "zeros", positions)  # (G, S, B, D)
            for g in range(positions.shape[0]):
                d = PatchDictionary(machine.images, P, "zeros", positions[g : g + 1])
                inputs = kernel_inputs(q[g].reshape(1, -1, q.shape[-1]), d.select_groups([0]), ABAR)
                keys, values = d.entries(0, images, torch.float32)
                qi = pykeops.LazyTensor(inputs.q[0][:, None, :] * math.log(2))
                kj = pykeops.LazyTensor(keys[0][None, :, :])
                bias = pykeops.LazyTensor((-inputs.key_scale * math.log(2) * (keys[0] ** 2).sum(-1))[None, :, None])
                vj = pykeops.LazyTensor(values[0][None, :, :])
                res = ((qi * kj).sum(-1) + bias).sumsoftmaxweight(vj, axis=1)
                out[:, :, positions[g]] = res.reshape(-1, B, C).permute(1, 2, 0)
        return out.reshape(B, C, H, W)

    return run


def test_cifar_sample(benchmark, cifar):
    device = _device()
    images, data = cifar
    started = time.perf_counter()
    machine = ScoreMachine(images).to(device)
    setup_s = time.perf_counter() - started

    def run():
        out = elsfast.sample(
            machine, n=SAMPLES, steps=STEPS, patch_size="CIFAR10_ResNet_zeros_conditional", seed=0, progress=False
        )
        _sync(device)
        return out

    out = benchmark.pedantic(run, rounds=1, iterations=1)
    assert out.shape == (SAMPLES, 3, 32, 32) and torch.isfinite(out).all()
    benchmark.extra_info.update(
        {
            "samples": SAMPLES,
            "steps": STEPS,
            "train_images": len(images),
            "data": data,
            "patch_sizes": "CIFAR10_ResNet_zeros_conditional",
            "backends": sorted(machine.total_stats.backends),
            "pairs": machine.total_stats.pairs,
            "seconds": benchmark.stats.stats.median,
            "machine_setup_s": setup_s,
        }
    )
