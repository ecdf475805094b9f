"""elsfast against the authors' code (Kambm/convolutional_diffusion @6a87f3f): the numbers docs/reproduction.md
("The authors' code") states, on the problem of SPEC section 4: the first 1,000 digits of `mnist-embedded` padded
to 32x32, ELS with zero padding, P = 5, t = 0.5 on the legacy cosine (abar = 0.5062).

- elsfast's side needs nothing else: the time of one batch-1 evaluation in float32 and float64, the time of one
  batch-8 evaluation, and the peak memory above the baseline of a fresh process (`extra_info["peak_mb"]`).
- the authors' side needs a checkout of their code: set ELSFAST_AUTHORS_CODE to its root (the folder holding
  `utils/idealscore.py`); without it those cases skip, saying so. It is not a dependency of elsfast. With it:
  the same timings and memory for their zero-padding module (`LocalEquivBordersScoreModule`, batch 1, and eight
  batch-1 calls, as it raises at batch 8) and their circular module (`LocalEquivScoreModule`, batch 8), and the
  agreement in float64: one zero-padding evaluation (x0 within 4.6e-13) and a 20-step trajectory of their
  machine sampler with their circular module against `dictionary="valid"` (within 3.3e-12); and the error of
  their per-chunk averaging (LS and circular ELS, 200 digits in chunks of 64).

Run:  ELSFAST_AUTHORS_CODE=/path/to/convolutional_diffusion pytest benchmarks/bench_authors_code.py \
          -m benchmark --benchmark-only --benchmark-enable --benchmark-json=authors.json
"""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elsfast
from elsfast import datasets
from elsfast.common.schedules import abar_cosine_legacy

pytestmark = pytest.mark.benchmark

N, P, T = 1000, 5, 0.5
ABAR = abar_cosine_legacy(T)
AUTHORS = os.environ.get("ELSFAST_AUTHORS_CODE")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _problem(batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 `[N, 1, 32, 32]` training digits and N(0, 1) noisy images `[batch, 1, 32, 32]` (seed 0)."""
    images = datasets.load("mnist-embedded", pad_to=32).images[:N]
    x = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return images, x.to(dtype)


def _authors():
    """The authors' `utils.idealscore` from ELSFAST_AUTHORS_CODE, or a skip saying why it is not there."""
    if not AUTHORS:
        pytest.skip("the authors' code is not a dependency: set ELSFAST_AUTHORS_CODE to a checkout to run this case")
    if not (Path(AUTHORS) / "utils" / "idealscore.py").is_file():
        pytest.skip(f"ELSFAST_AUTHORS_CODE={AUTHORS} holds no utils/idealscore.py")
    sys.path.insert(0, AUTHORS)
    try:
        return importlib.import_module("utils.idealscore")
    except Exception as err:  # their module imports torchvision, matplotlib and more
        pytest.skip(f"the authors' utils.idealscore does not import here: {err!r}")
    finally:
        sys.path.remove(AUTHORS)


def _authors_module(idealscore, kind: str, dtype: torch.dtype):
    """Their zero-padding ("zeros") or circular module over the same digits in [-1, 1], chunks of 64 (default)."""
    images, _ = _problem(1, dtype)
    data = torch.utils.data.TensorDataset(images.to(dtype) / 127.5 - 1, torch.zeros(N, dtype=torch.int64))
    cls = {"zeros": idealscore.LocalEquivBordersScoreModule, "circular": idealscore.LocalEquivScoreModule}[kind]
    return cls(data, kernel_size=P, image_size=32, channels=1, schedule=idealscore.cosine_noise_schedule)


def _authors_x0(module, x: torch.Tensor) -> torch.Tensor:
    """Their score at t = T, turned into x0 = (x + (1 - abar) score) / sqrt(abar); computed in x's dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)  # their buffers are torch.zeros(...) in the default dtype
    try:
        score = module(torch.tensor(T, dtype=x.dtype), x, device=torch.device("cpu"))  # a scalar t (SPEC 4)
    finally:
        torch.set_default_dtype(previous)
    return (x + (1 - ABAR) * score) / math.sqrt(ABAR)


def _peak_mb(code: str) -> float:
    """Peak resident memory (MB) of a fresh process running `code` (which ends by calling `run()`), above the
    resident memory it had just before `run()` (VmHWM after minus VmRSS before, from /proc/self/status)."""
    probe = (
        "def _mb(key):\n"
        "    return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) / 1024\n"
        f"{code}\n"
        "before = _mb('VmRSS')\n"
        "run()\n"
        "print(_mb('VmHWM') - before)\n"
    )
    paths = [str(Path(elsfast.__file__).parents[1])] + ([AUTHORS] if AUTHORS else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return float(done.stdout.split()[-1])


_SETUP = (
    "import math, torch, elsfast\n"
    "from elsfast import datasets\n"
    f"images = datasets.load('mnist-embedded', pad_to=32).images[:{N}]\n"
    "x = torch.randn({batch}, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)\n"
    "x = x.to(torch.{dtype})\n"
)


@pytest.mark.parametrize(("batch", "dtype"), [(1, "float32"), (1, "float64"), (8, "float32")])
def test_elsfast_els_zeros(benchmark, batch, dtype):
    """elsfast, backend "auto": one evaluation of `batch` noisy images (docs: 0.30-0.33 s / 1.8-2.6 s, 6 MB /
    0.2 GB at batch 1; 1.8 s at batch 8 on `cpu`)."""
    benchmark.group = f"authors-els-zeros-batch{batch}"
    images, x = _problem(batch, DTYPES[dtype])
    m = elsfast.ScoreMachine(images, machine="els", padding="zeros", dtype=DTYPES[dtype])
    m.denoise(x, ABAR, P)  # warm-up: the compiled kernel loads once per process
    benchmark.pedantic(m.denoise, args=(x, ABAR, P), rounds=3, iterations=1)
    benchmark.extra_info["backends"] = sorted(m.last_stats.backends)
    benchmark.extra_info["peak_mb"] = _peak_mb(
        _SETUP.format(batch=batch, dtype=dtype)
        + f"m = elsfast.ScoreMachine(images, machine='els', padding='zeros', dtype=torch.{dtype})\n"
        f"def run():\n    m.denoise(x, {ABAR!r}, {P})\n"
    )


@pytest.mark.parametrize(
    ("kind", "batch", "dtype"),
    [("zeros", 1, "float32"), ("zeros", 1, "float64"), ("circular", 8, "float32"), ("zeros-8-calls", 8, "float32")],
)
def test_authors_els(benchmark, kind, batch, dtype):
    """The authors' modules (docs: zeros at batch 1 9.5-14 s / 18-23 s and 0.9 / 1.9 GB; circular at batch 8
    57 s and 5.6 GB; eight batch-1 calls of zeros 43 s and 0.8 GB)."""
    idealscore = _authors()
    benchmark.group = f"authors-{kind}-batch{batch}"
    _, x = _problem(batch, DTYPES[dtype])
    module = _authors_module(idealscore, kind.split("-")[0], DTYPES[dtype])
    calls = [x[k : k + 1] for k in range(batch)] if kind == "zeros-8-calls" else [x]

    def run():
        for part in calls:
            _authors_x0(module, part)

    benchmark.pedantic(run, rounds=1, iterations=1)
    cls = "LocalEquivBordersScoreModule" if kind.startswith("zeros") else "LocalEquivScoreModule"
    split = "[x[k:k+1] for k in range(x.shape[0])]" if kind == "zeros-8-calls" else "[x]"
    benchmark.extra_info["peak_mb"] = _peak_mb(
        _SETUP.format(batch=batch, dtype=dtype) + "from utils import idealscore\n"
        f"torch.set_default_dtype(torch.{dtype})\n"
        f"data = torch.utils.data.TensorDataset(images.to(torch.{dtype}) / 127.5 - 1, torch.zeros({N}).long())\n"
        f"module = idealscore.{cls}(data, kernel_size={P}, image_size=32, channels=1, "
        "schedule=idealscore.cosine_noise_schedule)\n"
        f"def run():\n    for part in {split}:\n"
        f"        module(torch.tensor({T}), part, device=torch.device('cpu'))\n"
    )


def test_authors_zeros_agree_to_4_6e_13(benchmark):
    """One float64 zero-padding evaluation: the authors' x0 and elsfast's within 4.6e-13 (the largest of the
    recheck's 272 single evaluations)."""
    idealscore = _authors()
    images, x = _problem(1, torch.float64)
    m = elsfast.ScoreMachine(images, machine="els", padding="zeros", dtype=torch.float64)
    ours = m.denoise(x, ABAR, P)
    theirs = benchmark.pedantic(_authors_x0, args=(_authors_module(idealscore, "zeros", torch.float64), x), rounds=1)
    benchmark.extra_info["max_abs_diff"] = float((ours - theirs).abs().max())
    assert benchmark.extra_info["max_abs_diff"] <= 4.6e-13


def test_authors_trajectory_agrees_to_3_3e_12(benchmark):
    """Their machine sampler (19 updates from t = 19/20) with their circular module, float64, against elsfast's
    sampler with `dictionary="valid"` from the same noise: the final images within 3.3e-12."""
    idealscore = _authors()
    images, x = _problem(1, torch.float64)
    m = elsfast.ScoreMachine(images, machine="els", padding="circular", dictionary="valid", dtype=torch.float64)
    ours = elsfast.ddim_sample(lambda y, abar, i: m.denoise(y, abar, P), x, steps=20, progress=False)
    sampler = idealscore.ScheduledScoreMachine(
        _authors_module(idealscore, "circular", torch.float64),
        in_channels=1,
        imsize=32,
        noise_schedule=idealscore.cosine_noise_schedule,
        scales=[P] * 20,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = benchmark.pedantic(sampler, args=(x,), kwargs={"device": torch.device("cpu")}, rounds=1)
    finally:
        torch.set_default_dtype(previous)
    benchmark.extra_info["max_abs_diff"] = float((ours - theirs).abs().max())
    assert benchmark.extra_info["max_abs_diff"] <= 3.3e-12


@pytest.mark.parametrize("kind", ["ls", "circular"])
def test_authors_chunk_averaging_error(benchmark, kind):
    """Their LS (`LocalScoreModule`) and circular ELS on the first 200 digits in chunks of 64 (64, 64, 64, 8),
    float64, against elsfast's exact LS (zero padding) and circular ELS with `dictionary="valid"`: the largest
    |x0 difference| over a noisy digit at abar 0.3, 0.7, 0.9 and P 7, 9, 11 (the recheck: 0.53 for LS, 0.17 for
    circular ELS; `tests/test_authors_code.py` emulates the averaging without their code). Their t = 0.3, 0.7,
    0.9 on the legacy cosine (abar 0.80, 0.21, 0.03)."""
    idealscore = _authors()
    mnist = datasets.load("mnist-embedded", pad_to=32)
    images = mnist.images[:200]
    data = torch.utils.data.TensorDataset(images.to(torch.float64) / 127.5 - 1, torch.zeros(200, dtype=torch.int64))
    if kind == "ls":
        theirs = idealscore.LocalScoreModule(
            data, image_size=32, batch_size=64, schedule=idealscore.cosine_noise_schedule
        )
        ours = elsfast.ScoreMachine(images, machine="ls", padding="zeros", dtype=torch.float64)
    else:
        theirs = idealscore.LocalEquivScoreModule(
            data, image_size=32, channels=1, batch_size=64, schedule=idealscore.cosine_noise_schedule
        )
        ours = elsfast.ScoreMachine(images, machine="els", padding="circular", dictionary="valid", dtype=torch.float64)
    clean = mnist.images[1000:1001].to(torch.float64) / 127.5 - 1  # a digit outside the 200
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for t in (0.3, 0.7, 0.9):
            abar = abar_cosine_legacy(t)
            for p in (7, 9, 11):
                x = math.sqrt(abar) * clean + math.sqrt(1 - abar) * torch.randn(
                    clean.shape, generator=gen, dtype=torch.float64
                )
                score = theirs(torch.tensor(t), x, device=torch.device("cpu"), k=p)
                x0 = (x + (1 - abar) * score) / math.sqrt(abar)
                worst = max(worst, float((x0 - ours.denoise(x, abar, p)).abs().max()))
    finally:
        torch.set_default_dtype(previous)
    benchmark.extra_info["max_abs_diff"] = worst
    benchmark.pedantic(lambda: None, rounds=1)
    assert worst > 0.1, worst
