"""One conformance suite for every reduction backend, generated from the registry.

Every registered backend (in the test configuration of `CONFIGURED` where it has one, else its registered default,
so a newly registered backend is tested with no new test code), the CUDA source's algorithm run on the host
(`CudaOnHost`), every instruction set of the CPU kernels, and `auto` run the same cases against the float64
brute force of tests/reference.py. With a CUDA device the same variants run on it too (marked `gpu`).

The cases cover every pair of values of the factors in `FACTORS` (machine x padding, conditioning, channels,
batch, noise level, dtype, training images, patch size) on non-square images, with fixed seeds from the case's
parameters. For each case and variant:
- a backend that refuses must give reasons, each one of its declared `LIMITS`;
- otherwise the result is within the backend's declared `accuracy(dtype)` of the reference (`Tolerance`: a
  multiple of eps(dtype) times the problem's largest logit magnitude, plus an absolute term);
- a run with every float buffer the backend allocates pre-filled with NaN (`torch.empty`) gives the same result,
  bit for bit, as a plain run: no unwritten output, no nondeterminism;
- a run with the smallest memory budget is within the same tolerance;
- the reported backends are the ones whose kernels ran (spied at the kernels, not at the dispatch).
Refusals pass, so every variant must also compute at least `MIN_COMPUTED` cases on a device it runs on (extra
float32 patch cases, `EXTRA_CASES`, keep the compiled CPU kernels above it); tests/conftest.py prints the counts at
the end of the session. Provenance (source image, y, x, weight, entropy) is checked against the reference for every
variant, every machine and both ELS dictionaries, and the accuracy each CPU-side backend declares is pinned here.
A failing case's message names its seed and parameters.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import itertools
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from problems import COMBOS, CudaOnHost, key_dim, logit_range, reference, stable_seed

import elsfast.kernels.softmax_reduce as triton_kernels
from elsfast import ScoreMachine
from elsfast.reduce import Backend, BackendUnavailable, Cpu, Dedup, Shifts, TopK, Triton, backend_names
from elsfast.reduce.registry import get_backend
from elsfast.reduce.topk import TopK as TopKClass
from elsfast.reduce.torch_backend import TorchBackend

FACTORS = {
    "combo": tuple(COMBOS),
    "conditional": (False, True),
    "C": (1, 3),
    "B": (1, 3),
    "abar": (1e-4, 0.05, 0.5, 0.999, 0.9999),
    "dtype": ("float32", "float64"),
    "train": ("float", "uint8", "binary"),
    "P": (1, 3, 5, 7),
    "dictionary": ("same", "valid"),  # ELS only (the authors' valid-patch dictionary); other machines ignore it
}


def pairwise_cases(factors: dict[str, tuple], seed: int = 20261202, candidates: int = 100) -> list[dict]:
    """A small set of cases in which every pair of values of two factors appears (greedy covering array, fixed
    seed: the same cases in every process)."""
    names, values = list(factors), list(factors.values())
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(len(values[i]))
        for b in range(len(values[j]))
    }
    pairs = lambda row: {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(row)), 2)}  # noqa: E731
    rng = random.Random(seed)
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        best = None
        for _ in range(candidates):
            row = [rng.randrange(len(v)) for v in values]
            row[i], row[j] = a, b
            gain = len(pairs(row) & uncovered)
            if best is None or gain > best[0]:
                best = (gain, row)
        rows.append(best[1])
        uncovered -= pairs(best[1])
    return [{name: values[k][v] for k, (name, v) in enumerate(zip(names, row, strict=True))} for row in rows]


CASES = pairwise_cases(FACTORS)

# Cases the compiled CPU kernels compute (float32, patch dictionaries; zero-padded ELS for `shifts`), so that every
# backend that runs on this machine computes at least `MIN_COMPUTED` cases rather than refusing them.
EXTRA_CASES = [
    {"combo": combo, "conditional": cond, "C": C, "B": B, "abar": abar, "dtype": "float32", "train": train, "P": P}
    | {"dictionary": "same"}
    for combo, cond, C, B, abar, train, P in [
        (("els", "zeros"), False, 1, 1, 0.5, "uint8", 3),
        (("els", "zeros"), True, 3, 3, 0.999, "float", 3),
        (("els", "zeros"), False, 3, 3, 1e-4, "binary", 5),
        (("els", "zeros"), True, 1, 1, 0.05, "uint8", 7),
        (("els", "zeros"), False, 1, 3, 0.9999, "float", 5),
        (("els", "zeros"), True, 3, 1, 0.5, "binary", 1),
        (("ls", "zeros"), True, 1, 3, 0.5, "uint8", 3),
    ]
]
ALL_CASES = CASES + EXTRA_CASES
MIN_COMPUTED = 8  # cases each backend must compute (not refuse) on the devices it runs on


def case_id(case: dict) -> str:
    machine, padding = case["combo"]
    P = case["P"] if machine in ("ls", "els") else "-"
    cond = "cond" if case["conditional"] else "uncond"
    sizes = f"C{case['C']}-B{case['B']}-P{P}-abar{case['abar']:g}"
    valid = "-valid" if dictionary_of(case) == "valid" else ""
    return f"{machine}-{padding}{valid}-{cond}-{sizes}-{case['dtype']}-{case['train']}"


def dictionary_of(case: dict) -> str:
    """The case's dictionary: "valid" only for ELS (with a patch that fits the 9 x 7 images)."""
    return case["dictionary"] if case["combo"][0] == "els" else "same"


def make_case(case: dict):
    """(seed, training images as the machine gets them, the same in [-1, 1] float64, queries, labels of both)."""
    machine, _ = case["combo"]
    seed = stable_seed(case_id(case))
    g = torch.Generator().manual_seed(seed)
    # ELS: 9 x 7 images have interior, edge and corner groups; 20 images x 63 positions fill no 256-entry tile and
    # no 8- or 16-image lane block. LS has a group per pixel: smaller images keep the per-group work small.
    N, (H, W) = {"is": (12, (9, 7)), "es": (6, (5, 6)), "ls": (20, (5, 4))}.get(machine, (20, (9, 7)))
    C, B, abar = case["C"], case["B"], case["abar"]
    if case["train"] == "float":
        train = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
        train = train.to(getattr(torch, case["dtype"]))
    elif case["train"] == "uint8":
        train = torch.randint(0, 256, (N, C, H, W), generator=g, dtype=torch.uint8)
    else:  # binary strokes on a flat background, the same in every channel: patches repeat (MNIST-like)
        train = (torch.rand(N, 1, H, W, generator=g) < 0.1).expand(N, C, H, W).to(torch.uint8) * 255
    exact = train.double() / 127.5 - 1 if train.dtype == torch.uint8 else train.double()
    base = torch.rand(B, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    x = math.sqrt(abar) * base + math.sqrt(1 - abar) * torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    x = x.to(getattr(torch, case["dtype"]))
    train_labels = labels = None
    if case["conditional"]:
        train_labels = torch.arange(N) % 3
        labels = torch.randint(0, 3, (B,), generator=g)
    return seed, train, exact, x, train_labels, labels


@functools.cache
def expected(index: int) -> np.ndarray:
    """The float64 brute force for case `index` (computed once, shared by every variant)."""
    case = ALL_CASES[index]
    _, _, exact, x, train_labels, labels = make_case(case)
    machine, padding = case["combo"]
    P, dictionary = case["P"], dictionary_of(case)
    return reference(x.double(), exact, case["abar"], machine, padding, P, labels, train_labels, dictionary=dictionary)


# --- the variants ------------------------------------------------------------------------------------------------


# Test configurations: small tiles and forced splits, so that tiny problems still cross tile and split borders;
# top-k on every group, with a flat index and no pilot, so that some queries are answered approximately.
CONFIGURED: dict[str, Backend] = {
    "triton": Triton(block_m=32, block_n=128, splits=3),
    "cpu": Cpu(splits=3, tiles_per_chunk=1),
    "shifts": Shifts(splits=3),
    "dedup": Dedup(splits=3),
    "topk": TopK(k=8, index="flat", min_entries=1, min_pass_fraction=0.0, cache_dir="", progress=False),
}


def _variants() -> list[tuple[str, Backend | str]]:
    variants = [(name, CONFIGURED.get(name, get_backend(name))) for name in backend_names()]
    if importlib.util.find_spec("elsfast._cpu") is not None:
        import elsfast._cpu as ext

        for isa in ext.isas()[:-1]:  # the narrower instruction sets too ("auto" runs the widest)
            variants.append((f"cpu-{isa}", Cpu(splits=3, tiles_per_chunk=1, isa=isa)))
            variants.append((f"shifts-{isa}", Shifts(splits=3, isa=isa)))
            variants.append((f"dedup-{isa}", Dedup(splits=3, isa=isa)))
    if importlib.util.find_spec("elsfast._cuda") is not None:
        variants.append(("cuda-host", CudaOnHost()))
    variants.append(("auto", "auto"))
    return variants


VARIANTS = _variants()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


# --- spying on the kernels that ran ----------------------------------------------------------------------------


def spy_kernels(monkeypatch) -> set[str]:
    """Record, by backend name, every kernel that computes a reduction: the compiled CPU kernel (`dedup` when it
    gets a logit bias), the shift kernel, the CUDA extension (`cuda-host` on the host), the Triton launcher, the
    torch path and top-k's search. Returns the set that fills as they run."""
    ran: set[str] = set()

    def wrap(owner, attr, name_of):
        original = getattr(owner, attr)

        def spy(*args, **kwargs):
            ran.add(name_of(args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, spy)

    if importlib.util.find_spec("elsfast._cpu") is not None:
        import elsfast._cpu as cpu_ext

        wrap(cpu_ext, "reduce", lambda a, k: "dedup" if k["image_bias"] is not None else "cpu")
        wrap(cpu_ext, "reduce_shifts", lambda a, k: "shifts")
    if importlib.util.find_spec("elsfast._cuda") is not None:
        import elsfast._cuda as cuda_ext

        wrap(cuda_ext, "reduce", lambda a, k: "cuda-host" if k["host"] else "cuda")
    wrap(triton_kernels, "launch_softmax_reduce", lambda a, k: "triton")
    wrap(TorchBackend, "reduce", lambda a, k: "torch")
    wrap(TopKClass, "_search_block", lambda a, k: "topk")
    return ran


def nan_filled_allocations(monkeypatch) -> None:
    """Make every float `torch.empty`/`torch.empty_like` come back filled with NaN (an output a kernel forgets to
    write then shows)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))


# --- what each variant computed and refused (printed at the end of the session by tests/conftest.py) -------------

OUTCOMES: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
COMPUTED: dict[tuple[str, str], int] = {}  # cases computed by each variant on each device


# --- the suite ---------------------------------------------------------------------------------------------------


def _accuracy(variant: Backend | str, ran: set[str], dtype: torch.dtype):
    """The declared tolerance: the variant's own, or under `auto` the loosest of the backends that ran."""
    if isinstance(variant, Backend):
        return [variant.accuracy(dtype)]
    return [get_backend(name).accuracy(dtype) for name in ran]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(ALL_CASES)), ids=[case_id(c) for c in ALL_CASES])
@pytest.mark.parametrize(("name", "variant"), VARIANTS, ids=[name for name, _ in VARIANTS])
def test_conformance(name, variant, index, device, monkeypatch):
    case = ALL_CASES[index]
    machine, padding = case["combo"]
    seed, train, exact, x, train_labels, labels = make_case(case)
    dtype, abar, P = getattr(torch, case["dtype"]), case["abar"], case["P"]
    where = f"seed {seed}, case {case_id(case)}, backend {name}"
    make = lambda budget: ScoreMachine(  # noqa: E731
        train, train_labels, machine=machine, padding=padding, backend=variant, dtype=dtype, memory_budget=budget,
        device=device, dictionary=dictionary_of(case),
    )  # fmt: skip
    x = x.to(device)
    try:
        ran = spy_kernels(monkeypatch)
        with monkeypatch.context() as poisoned:
            nan_filled_allocations(poisoned)
            m = make(512 << 20)
            first = m.denoise(x, abar, P, labels).cpu()
    except BackendUnavailable as refusal:
        assert isinstance(variant, Backend), f"{where}: auto found no backend: {refusal}"
        assert refusal.reasons, f"{where}: refused without a reason: {refusal}"
        for reason in refusal.reasons:
            assert reason.startswith(tuple(variant.LIMITS.values())), f"{where}: undeclared limit {reason!r}"
        OUTCOMES[name, device]["refused"] += 1
        return
    OUTCOMES[name, device]["computed"] += 1
    stats = m.last_stats
    # the reported backends are those whose kernels ran (top-k only where it answered a query)
    kernels = ran - {"topk"} | ({"topk"} if stats.approximate_queries else set())
    assert stats.backends == kernels, f"{where}: reported {stats.backends}, kernels that ran {kernels}"
    if isinstance(variant, Backend) and variant.EXACT:
        assert stats.backends == {variant.NAME}, where
        assert stats.approximate_queries == 0 and stats.pairs <= stats.exact_pairs, where
    if variant == "auto":
        assert all(get_backend(n).EXACT for n in stats.backends), f"{where}: auto ran {stats.backends}"
    second = make(512 << 20).denoise(x, abar, P, labels).cpu()
    assert not torch.isnan(first).any(), f"{where}: NaN in the output (an unwritten buffer?)"
    assert torch.equal(first, second), f"{where}: two runs differ by {(first - second).abs().max():.3g}"
    small = make(1).denoise(x, abar, P, labels).cpu()
    L = logit_range(x.double().cpu(), exact, abar, P, machine)
    atol = max(t.bound(dtype, L, key_dim(train, machine, P)) for t in _accuracy(variant, stats.backends, dtype))
    want = expected(index)
    for label, out in (("default budget", first), ("memory_budget=1", small)):
        assert out.dtype == dtype and out.shape == x.shape, where
        err = np.abs(out.double().numpy() - want).max()
        assert err <= atol, f"{where}, {label}: max error {err:.3g} > declared {atol:.3g}"


# Backends whose kernels run on CUDA tensors (the others refuse them, and their counts are taken on the CPU).
RUNS_ON_CUDA = {"triton", "cuda", "torch", "topk", "auto"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "variant"), VARIANTS, ids=[name for name, _ in VARIANTS])
def test_each_backend_computes_enough_cases(name, variant, device):
    """A refusal passes the conformance test, so each variant must also compute (with its own kernels, not refuse)
    at least `MIN_COMPUTED` of the cases on a device it runs on; the counts are printed at the end of the session."""
    kind = variant.NAME if isinstance(variant, Backend) else variant
    if device == "cuda" and kind not in RUNS_ON_CUDA:
        pytest.skip(f"{name} runs on CPU tensors only")
    if device == "cpu" and kind == "cuda":
        pytest.skip("cuda runs on CUDA tensors only (its algorithm is counted on the host as cuda-host)")
    computed = []
    for case in ALL_CASES:
        machine, padding = case["combo"]
        _, train, _, x, train_labels, labels = make_case(case)
        m = ScoreMachine(
            train, train_labels, machine=machine, padding=padding, backend=variant,
            dtype=getattr(torch, case["dtype"]), device=device, dictionary=dictionary_of(case),
        )  # fmt: skip
        try:
            m.denoise(x.to(device), case["abar"], case["P"], labels)
        except BackendUnavailable:
            continue
        if kind == "auto" or kind in m.last_stats.backends:
            computed.append(case_id(case))
    COMPUTED[name, device] = len(computed)
    print(f"{name} on {device}: computed {len(computed)} of {len(ALL_CASES)} cases")
    assert len(computed) >= MIN_COMPUTED, f"{name} on {device} computed only {computed}"


# (machine, padding, dictionary, conditional, C, B, P, abar, dtype) of the provenance cases: float training images
# (no two patches equal, so the dominant entry is unique), both dictionaries of ELS, every machine.
PROVENANCE_CASES = [
    {"combo": (machine, padding), "dictionary": dictionary, "conditional": cond, "C": C, "B": B, "P": P}
    | {"abar": abar, "dtype": dtype, "train": "float"}
    for machine, padding, dictionary, cond, C, B, P, abar, dtype in [
        ("els", "zeros", "same", False, 1, 2, 3, 0.5, "float32"),
        ("els", "zeros", "valid", True, 3, 1, 3, 0.9, "float32"),
        ("els", "circular", "valid", False, 1, 2, 5, 0.99, "float64"),
        ("els", "circular", "same", False, 1, 1, 5, 0.05, "float32"),
        ("els", "zeros", "valid", False, 1, 2, 3, 0.5, "float64"),
        ("ls", "zeros", "same", False, 3, 1, 3, 0.5, "float32"),
        ("is", "zeros", "same", True, 1, 2, 3, 0.9, "float64"),
        ("es", "circular", "same", False, 1, 1, 3, 0.5, "float32"),
    ]
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PROVENANCE_CASES, ids=[case_id(c) for c in PROVENANCE_CASES])
@pytest.mark.parametrize(("name", "variant"), VARIANTS, ids=[name for name, _ in VARIANTS])
def test_provenance(name, variant, case, device):
    """What a user reads beside the image: each pixel's source image, y and x (exactly those of the float64 brute
    force's dominant entry), the entry's posterior weight (within the declared tolerance) and the posterior's
    entropy (within the tolerance times 1 + ln(entries): a logit error d moves the entropy by at most d times the
    spread of the log-weights)."""
    machine, padding = case["combo"]
    seed, train, exact, x, train_labels, labels = make_case(case)
    dtype, abar, P = getattr(torch, case["dtype"]), case["abar"], case["P"]
    where = f"seed {seed}, case {case_id(case)}, backend {name}"
    m = ScoreMachine(
        train, train_labels, machine=machine, padding=padding, backend=variant, dtype=dtype, device=device,
        dictionary=dictionary_of(case),
    )  # fmt: skip
    try:
        _, prov = m.denoise(x.to(device), abar, P, labels, return_provenance=True)
    except BackendUnavailable as refusal:
        assert isinstance(variant, Backend), f"{where}: auto found no backend: {refusal}"
        for reason in refusal.reasons:
            assert reason.startswith(tuple(variant.LIMITS.values())), f"{where}: undeclared limit {reason!r}"
        return
    want = reference(x.double(), exact, abar, machine, padding, P, labels, train_labels, True, dictionary_of(case))
    sources = (prov.source_image, prov.source_y, prov.source_x)
    for field, got, ref in zip(("image", "y", "x"), sources, want[:3], strict=True):
        wrong = (got.cpu().numpy() != ref).sum()
        assert wrong == 0, f"{where}: source {field} differs from the reference at {wrong} pixels"
    L = logit_range(x.double(), exact, abar, P, machine)
    atol = max(t.bound(dtype, L, key_dim(train, machine, P)) for t in _accuracy(variant, m.last_stats.backends, dtype))
    entries = train.shape[0] * train.shape[2] * train.shape[3]
    for field, got, ref, tol in (
        ("weight", prov.weight, want[3], atol),
        ("entropy", prov.entropy, want[4], atol * (1 + math.log(entries))),
    ):
        err = np.abs(got.double().cpu().numpy() - ref).max()
        assert err <= tol, f"{where}: {field} off by {err:.3g} > {tol:.3g}"


# The accuracy every backend declares, pinned here rather than read from the code under test (a backend could
# otherwise pass the suite by loosening its own `accuracy()`): (per_logit, absolute, per_feature) per dtype. The
# compiled kernels' float32 bounds are derived in docs/design.md ("Error bounds of the fused kernels"): a logit is
# off by (per_logit + per_feature D) eps32 L; the sums add (2 k + 6) u for tiles of k terms, plus the exponential's
# relative error and 1e-9 for the fp64 folds.
U = 2.0**-24
DECLARED_ACCURACY = {
    "torch": {torch.float32: (4.0, 1e-6, 0.0), torch.float64: (8.0, 1e-9, 0.0)},
    "cpu": {torch.float32: (3.0, 2.0**-21 + 46 * U + 1e-9, 0.5), torch.float64: (8.0, 1e-9, 0.0)},
    "dedup": {torch.float32: (3.0, 2.0**-21 + 46 * U + 1e-9, 0.5), torch.float64: (8.0, 1e-9, 0.0)},
    "shifts": {torch.float32: (8.0, 1e-6, 0.0), torch.float64: (8.0, 1e-9, 0.0)},
    "cuda": {torch.float32: (3.0, 4 * U + 70 * U + 1e-9, 0.5), torch.float64: (8.0, 1e-9, 0.0)},
    "cuda-host": {torch.float32: (3.0, 4 * U + 70 * U + 1e-9, 0.5), torch.float64: (8.0, 1e-9, 0.0)},
    # "auto": the looser of fp16x2 (uint8 images) and tf32x3 (float32 images), tiles of up to 128 entries
    "triton": {torch.float32: (6.0, 2.0**-22 + 262 * U + 1e-9, 3.0), torch.float64: (8.0, 1e-9, 0.0)},
    # the exact backends' bound plus twice the certified neglected mass (default tolerance 1e-4)
    "topk": {torch.float32: (8.0, 1e-6 + 2e-4, 0.0), torch.float64: (8.0, 1e-9 + 2e-4, 0.0)},
}


@pytest.mark.parametrize("name", sorted(DECLARED_ACCURACY))
def test_declared_accuracy_is_pinned(name):
    backend = CudaOnHost() if name == "cuda-host" else get_backend(name)
    for dtype, (per_logit, absolute, per_feature) in DECLARED_ACCURACY[name].items():
        declared = backend.accuracy(dtype)
        assert declared.per_logit == per_logit, (name, dtype, declared)
        assert declared.per_feature == per_feature, (name, dtype, declared)
        assert declared.absolute == pytest.approx(absolute, rel=1e-12, abs=0), (name, dtype, declared)


def test_the_cases_cover_every_pair_and_do_not_depend_on_the_process():
    """Every pair of factor values appears, and the cases are fixed numbers (PYTHONHASHSEED cannot change them)."""
    for (f1, v1), (f2, v2) in itertools.combinations(FACTORS.items(), 2):
        seen = {(c[f1], c[f2]) for c in CASES}
        assert seen == set(itertools.product(v1, v2)), (f1, f2)
    assert pairwise_cases(FACTORS) == CASES
    assert stable_seed(case_id(CASES[0])) == stable_seed(case_id(dict(CASES[0])))


DIGEST = """
import hashlib, sys
sys.path.insert(0, "tests")
import test_backends as t
digest = hashlib.sha256()
for case in t.ALL_CASES:
    seed, train, exact, x, train_labels, labels = t.make_case(case)
    digest.update(t.case_id(case).encode() + str(seed).encode() + train.numpy().tobytes() + x.numpy().tobytes())
print(len(t.ALL_CASES), digest.hexdigest())
"""


@pytest.mark.slow_ci
def test_the_problems_do_not_depend_on_the_hash_seed():
    """`PYTHONHASHSEED=0` and `=1` draw the same cases and the same data (no seed comes from `hash()`)."""
    outputs = []
    for hash_seed in ("0", "1"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        done = subprocess.run(
            [sys.executable, "-c", DIGEST], env=env, cwd=root, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]
    assert int(outputs[0].split()[0]) == len(ALL_CASES)


def test_every_registered_backend_declares_limits_and_accuracy():
    for name in backend_names():
        backend = get_backend(name)
        assert name == backend.NAME and isinstance(backend.LIMITS, dict)
        for dtype in (torch.float32, torch.float64):
            assert backend.accuracy(dtype).bound(dtype, 1.0, key_dim=9) > 0
