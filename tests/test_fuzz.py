"""Property-based tests of the public entry points (issue 15, item 12; issue 27): `ScoreMachine`, `denoise`,
`sample`, `softmax_reduce` and `elsfast sample`.

Valid input gives a finite result equal to the float64 brute force of tests/reference.py on small problems;
invalid input raises ValueError or TypeError with a message naming the argument (the CLI: exit status 2 and one
`elsfast: error:` line naming the flag); never another exception type, a hang (each example runs under an alarm)
or a changed or removed file. The default run takes well under a minute; `pytest -m fuzz_long tests/test_fuzz.py`
runs the same properties with many more examples.
"""

import contextlib
import math
import os
import signal
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from problems import COMBOS, fp32_tolerance, reference

import elsfast
from elsfast.cli import main

QUICK = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
ALARM_SECONDS = 120  # an example that runs longer than this is a hang


@contextlib.contextmanager
def no_hang(seconds: int = ALARM_SECONDS):
    def timeout(signum, frame):
        raise AssertionError(f"no result within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _snapshot(directory) -> dict[str, bytes]:
    return {p: open(os.path.join(directory, p), "rb").read() for p in sorted(os.listdir(directory))}


# ---------------------------------------------------------------------------------------------- valid input


@st.composite
def problems(draw):
    """A small valid machine problem: (machine kwargs, train images, train labels, x, abar, P, labels)."""
    machine, padding = draw(st.sampled_from(COMBOS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    N, C = draw(st.integers(1, 5)), draw(st.integers(1, 2))
    H, W = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    B = draw(st.integers(0, 3))
    # beyond 2 max(H, W) - 1 zero padding runs at that size and circular padding is refused (test_bad_input)
    beyond = [2 * max(H, W) + 3] if padding == "zeros" or machine in ("is", "es") else []
    P = draw(st.sampled_from([1, 3, 5, 2 * max(H, W) - 1, *beyond]))
    abar = draw(st.floats(0.02, 0.98))
    as_uint8 = draw(st.booleans())
    if as_uint8:
        train = torch.randint(0, 256, (N, C, H, W), generator=g, dtype=torch.uint8)
    else:
        train = torch.rand(N, C, H, W, generator=g, dtype=torch.float64) * 2 - 1
    conditional = draw(st.booleans())
    train_labels = labels = None
    if conditional:
        train_labels = torch.arange(N) % 2
        labels = torch.randint(0, min(N, 2), (B,), generator=g)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    budget = draw(st.sampled_from([1, "1K", 512 << 20]))
    kwargs = {"machine": machine, "padding": padding, "dtype": dtype, "memory_budget": budget}
    return kwargs, train, train_labels, x, abar, P, labels


def _check_valid_denoise(problem):
    kwargs, train, train_labels, x, abar, P, labels = problem
    with no_hang(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "float train_images lie in", UserWarning)  # few random pixels may all be >= 0
        m = elsfast.ScoreMachine(train, train_labels, **kwargs)
        out = m.denoise(x.to(kwargs["dtype"]), abar, P, labels)
    assert out.shape == x.shape and out.dtype == kwargs["dtype"]
    assert torch.isfinite(out).all()
    if x.shape[0] == 0:
        return
    train64 = train.double() / 127.5 - 1 if train.dtype == torch.uint8 else train
    expected = torch.from_numpy(
        reference(x, train64, abar, kwargs["machine"], kwargs["padding"], P, labels, train_labels)
    )
    if kwargs["dtype"] == torch.float64:
        tol = 1e-9
    else:
        tol = fp32_tolerance(x.float(), train64.float(), abar, min(P, 2 * max(x.shape[2:]) - 1), kwargs["machine"])
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


@QUICK
@given(problems())
def test_valid_denoise_equals_the_float64_reference(problem):
    _check_valid_denoise(problem)


@pytest.mark.fuzz_long
@LONG
@given(problems())
def test_valid_denoise_equals_the_float64_reference_long(problem):
    _check_valid_denoise(problem)


def _check_valid_sample(seed: int, steps: int, n: int, P: int, machine: str):
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    padding = "circular" if machine == "es" else "zeros"
    m = elsfast.ScoreMachine(train, machine=machine, padding=padding, dtype=torch.float64)
    with no_hang():
        out = elsfast.sample(m, n=n, steps=steps, patch_size=P, seed=seed, progress=False)
    assert out.shape == (n, 1, 4, 4) and torch.isfinite(out).all()

    def reference_denoiser(x, abar, step):
        return torch.from_numpy(reference(x, train, abar, machine, padding, P))

    noise = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)).double()
    expected = elsfast.ddim_sample(reference_denoiser, noise, steps=steps, progress=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-8)


@QUICK
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 4),
    st.integers(1, 2),
    st.sampled_from([1, 3, 5]),
    st.sampled_from(["is", "es", "ls", "els"]),
)
def test_valid_sample_equals_the_reference_sampler(seed, steps, n, P, machine):
    _check_valid_sample(seed, steps, n, P, machine)


@pytest.mark.fuzz_long
@LONG
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 6),
    st.integers(1, 3),
    st.sampled_from([1, 3, 5, 7, 9]),
    st.sampled_from(["is", "es", "ls", "els"]),
)
def test_valid_sample_equals_the_reference_sampler_long(seed, steps, n, P, machine):
    _check_valid_sample(seed, steps, n, P, machine)


# ---------------------------------------------------------------------------------------------- invalid input

NAN = float("nan")
GOOD_TRAIN = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1

# (argument named in the message, constructor kwargs that break it); everything else valid
BAD_MACHINES = [
    ("train_images", {"train_images": GOOD_TRAIN[0]}),
    ("train_images", {"train_images": GOOD_TRAIN.long()}),
    ("train_images", {"train_images": GOOD_TRAIN * NAN}),
    ("train_images", {"train_images": GOOD_TRAIN * 3}),
    ("train_images", {"train_images": GOOD_TRAIN[:0]}),
    ("train_images", {"train_images": GOOD_TRAIN.tolist()}),
    ("train_labels", {"train_labels": [0, 1, 2]}),
    ("train_labels", {"train_labels": [0.5, 1.0, 2.0, 3.0]}),
    ("train_labels", {"train_labels": [[0, 1], [2, 3]]}),
    ("machine", {"machine": "ELS"}),
    ("machine", {"machine": None}),
    ("padding", {"padding": "reflect"}),
    ("padding", {"machine": "es", "padding": "zeros"}),
    ("backend", {"backend": "fastest"}),
    ("backend", {"backend": 3}),
    ("device", {"device": "gpu7"}),
    ("memory_budget", {"memory_budget": 0}),
    ("memory_budget", {"memory_budget": -(1 << 20)}),
    ("memory_budget", {"memory_budget": "lots"}),
    ("memory_budget", {"memory_budget": 2.5}),
    ("memory_budget", {"memory_budget": None}),
    ("dtype", {"dtype": torch.float16}),
]
if not torch.cuda.is_available():
    BAD_MACHINES.append(("device", {"device": "cuda"}))

# (argument, denoise kwargs that break it) for a conditional machine over GOOD_TRAIN
X = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
BAD_CALLS = [
    ("x", {"x": X[0]}),
    ("x", {"x": X[:, :, :3]}),
    ("x", {"x": X.long()}),
    ("x", {"x": X * NAN}),
    ("x", {"x": X * float("inf")}),
    ("x", {"x": X.numpy()}),
    ("x", {"x": X * 1e38}),
    ("abar", {"abar": 0.0}),
    ("abar", {"abar": 1.0}),
    ("abar", {"abar": -0.5}),
    ("abar", {"abar": NAN}),
    ("abar", {"abar": "half"}),
    ("abar", {"abar": torch.tensor([0.5, 0.5])}),
    ("patch_size", {"patch_size": 4}),
    ("patch_size", {"patch_size": 0}),
    ("patch_size", {"patch_size": -3}),
    ("patch_size", {"patch_size": 2.5}),
    ("patch_size", {"patch_size": NAN}),
    ("patch_size", {"patch_size": "3"}),
    ("patch_size", {"patch_size": None}),
    ("labels", {"labels": [1.9, 2.0]}),
    ("labels", {"labels": [0]}),
    ("labels", {"labels": [0, 1, 1]}),
    ("labels", {"labels": [True, False]}),
    ("labels", {"labels": ["a", "b"]}),
    ("class 7", {"labels": [7, 7]}),
]

BAD_SAMPLES = [
    ("n", {"n": 0}),
    ("n", {"n": -2}),
    ("n", {"n": 1.5}),
    ("n", {"n": "2"}),
    ("steps", {"steps": 1}),
    ("steps", {"steps": 2.5}),
    ("patch_size", {"patch_size": 4}),
    ("patch_size", {"patch_size": [3, 3]}),
    ("scales", {"patch_size": "No_Such_Scales"}),
    ("labels", {"labels": 1.7}),
    ("labels", {"labels": [0, 1, 0]}),
    ("schedule", {"schedule": "linear-ish"}),
    ("noise", {"noise": torch.zeros(3, 1, 4, 4)}),
    ("memory_budget", {"memory_budget": 0}),
    ("device", {"device": "gpu7"}),
    ("seed", {"seed": "abc"}),
    ("seed", {"seed": 2**70}),
    ("noise", {"noise": "noise"}),
    ("foo", {"foo": 1}),
]


def _expect_named_error(name: str, call) -> None:
    with no_hang(), pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value), f"{name!r} not named in: {info.value}"


@QUICK
@given(st.sampled_from(BAD_MACHINES))
def test_invalid_machine_arguments_raise_naming_them(case):
    name, broken = case
    kwargs = {"train_images": GOOD_TRAIN, **broken}
    _expect_named_error(name, lambda: elsfast.ScoreMachine(**kwargs))


@QUICK
@given(st.sampled_from(BAD_CALLS), st.sampled_from(["is", "els", "ls"]))
def test_invalid_denoise_arguments_raise_naming_them(case, machine):
    name, broken = case
    m = elsfast.ScoreMachine(GOOD_TRAIN, [0, 1, 0, 1], machine=machine)
    args = {"x": X, "abar": 0.5, "patch_size": 3, "labels": [0, 1], **broken}
    _expect_named_error(name, lambda: m.denoise(**args))


@QUICK
@given(st.sampled_from(BAD_SAMPLES))
def test_invalid_sample_arguments_raise_naming_them(case):
    name, broken = case
    kwargs = {"n": 2, "steps": 3, "progress": False, "train_labels": [0, 1, 0, 1], **broken}
    _expect_named_error(name, lambda: elsfast.sample(GOOD_TRAIN, **kwargs))


# ---------------------------------------------------------------------------------------------- the CLI

# (flag named in the error, argv fragment); the base command is valid and tiny
BAD_FLAGS = [
    ("--n", ["--n", "0"]),
    ("--n", ["--n", "two"]),
    ("--steps", ["--steps", "1"]),
    ("--patch-size", ["--patch-size", "4"]),
    ("--patch-size", ["--patch-size", "x"]),
    ("--scales", ["--scales", "No_Such_Scales"]),
    ("--memory-budget", ["--memory-budget", "0"]),
    ("--memory-budget", ["--memory-budget", "lots"]),
    ("--labels", ["--labels", "1.5"]),
    ("--labels", ["--labels", "0,1,2"]),
    ("--labels", ["--labels", "-1"]),
    ("--labels", ["--labels", "12"]),
    ("--machine", ["--machine", "bogus"]),
    ("--padding", ["--padding", "reflect"]),
    ("--device", ["--device", "gpu7"]),
    ("--backend", ["--backend", "fastest"]),
    ("--seed", ["--seed", "abc"]),
    ("--out", ["--out", "grid.jpg"]),
    ("--save", ["--save", "x.txt"]),
    ("--limit", ["--limit", "0"]),
    ("--pad-to", ["--pad-to", "-3"]),
    ("--schedule", ["--schedule", "linear-ish"]),
    ("--resume-from", ["--resume-from", "foreign.bin"]),
    ("--out", ["--out", "foreign.bin.png"]),
]


def _run_cli_bad(tmp_path, capsys, flag, fragment):
    (tmp_path / "foreign.bin").write_bytes(b"user data")
    (tmp_path / "foreign.bin.png").write_bytes(b"user picture")
    before = _snapshot(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with no_hang():
            code = main(["sample", "--limit", "12", "--n", "2", "--steps", "2", "--quiet", *fragment])
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("elsfast: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0], f"{flag} not named in: {lines[0]}"
    assert _snapshot(tmp_path) == before, "a refused command changed files"


@QUICK
@given(st.sampled_from(BAD_FLAGS))
def test_cli_sample_rejects_bad_flags_naming_them(tmp_path_factory, capsys, case):
    flag, fragment = case
    _run_cli_bad(tmp_path_factory.mktemp("cli"), capsys, flag, fragment)


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**31 - 1), st.sampled_from(["1", "3", "5"]))
def test_cli_sample_valid_runs_write_only_their_outputs(tmp_path_factory, seed, P):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "mine.txt").write_bytes(b"user data")
    out, saved = tmp / "g.png", tmp / "x.npz"
    argv = ["sample", "--limit", "12", "--n", "2", "--steps", "2", "--quiet", "--seed", str(seed % 1000)]
    with no_hang():
        assert main([*argv, "--patch-size", P, "--out", str(out), "--save", str(saved)]) == 0
    assert (tmp / "mine.txt").read_bytes() == b"user data"
    assert sorted(p.name for p in tmp.iterdir() if not p.name.startswith(".")) == ["g.png", "mine.txt", "x.npz"]
    with np.load(saved) as z:
        samples = z["samples"]
    assert samples.shape == (2, 1, 28, 28) and np.isfinite(samples).all() and math.isfinite(float(samples.sum()))


# (command, flag named in the error, argv) of train/calibrate/measure/reproduce: each refused before any work,
# the files in the folder untouched (issue 27: another command's file, a foreign file, a bad number)
_NET = ["--dataset", "mnist-embedded", "--limit", "8", "--max-steps", "1", "--channels", "4", "--blocks", "1", "-q"]
BAD_RESEARCH = [
    ("--out", ["train", *_NET, "--out", "foreign.bin", "--overwrite"]),
    ("--out", ["train", *_NET, "--out", "s.pt", "--overwrite"]),
    ("--out", ["train", *_NET, "--out", "net.pt"]),
    ("--out", ["train", *_NET, "--out", "foreign.bin/n.pt"]),
    ("--max-minutes", ["train", *_NET, "--out", "n.pt", "--max-minutes", "0"]),
    ("--checkpoint-minutes", ["train", *_NET, "--out", "n.pt", "--checkpoint-minutes", "-1"]),
    ("--out", ["calibrate", "--checkpoint", "net.pt", "-q", "--out", "m.json"]),
    ("--out", ["calibrate", "--checkpoint", "net.pt", "-q", "--out", "foreign.json"]),
    ("--plot", ["calibrate", "--checkpoint", "net.pt", "-q", "--out", "c.json", "--plot", "foreign.bin.png"]),
    ("--json", ["measure", "--limit", "12", "--samples", "s.pt", "--json", "calib.json"]),
    ("--json", ["measure", "--limit", "12", "--samples", "s.pt", "--json", "foreign.json"]),
    ("--samples", ["measure", "--limit", "12", "--samples", "foreign.bin"]),
    ("--out-dir", ["reproduce", "mnist-small", "-q", "--out-dir", "foreign.bin"]),
    ("--out-dir", ["reproduce", "mnist-small", "-q", "--out-dir", "theirs"]),
    ("--out-dir", ["reproduce", "mnist-small", "-q", "--out-dir", "other"]),
    ("--train-minutes", ["reproduce", "mnist-small", "-q", "--out-dir", "r", "--train-minutes", "0"]),
    ("--checkpoint-minutes", ["reproduce", "mnist-small", "-q", "--out-dir", "r", "--checkpoint-minutes", "x"]),
]


def _research_folder(tmp) -> None:
    """Files of every kind for BAD_RESEARCH: foreign ones, a calibration, samples, measures, a network."""
    import torch

    from elsfast.common.fileio import atomic_write
    from elsfast.common.imageio import save_samples
    from elsfast.research.calibrate import CalibrationResult

    (tmp / "foreign.bin").write_bytes(b"user data")
    (tmp / "foreign.bin.png").write_bytes(b"user picture")
    (tmp / "foreign.json").write_bytes(b'{"mine": true}')
    CalibrationResult(2, [3], [0], [None], torch.zeros(1, 2), torch.zeros(1, 2, 1)).to_json(tmp / "calib.json")
    save_samples(torch.zeros(1, 1, 28, 28), tmp / "s.pt")
    atomic_write(tmp / "m.json", lambda f: f.write(b"[]"), kind="measures")
    atomic_write(tmp / "net.pt", lambda f: torch.save({"format": "elsfast-checkpoint", "version": 1}, f))
    (tmp / "theirs").mkdir()
    (tmp / "theirs" / "reproduction.json").write_bytes(b'{"mine": true}')
    atomic_write(tmp / "other" / "calibration.json", lambda f: f.write(b"[]"), kind="measures")


@QUICK
@given(st.sampled_from(BAD_RESEARCH))
def test_cli_research_commands_refuse_bad_input_naming_it(tmp_path_factory, capsys, case):
    flag, argv = case
    tmp = tmp_path_factory.mktemp("research")
    _research_folder(tmp)
    before = {p.relative_to(tmp): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with no_hang():
            code = main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("elsfast: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert flag in lines[0], f"{flag} not named in: {lines[0]}"
    if "--overwrite" in argv:
        assert "add --resume" not in lines[0]  # --overwrite never suggests itself for a file it may not replace
    after = {p.relative_to(tmp): p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file()}
    assert after == before, "a refused command changed files"


# ---------------------------------------------------------------------------------------------- softmax_reduce


@st.composite
def reductions(draw):
    """A small valid reduction: (queries (G, M, D), dictionary, abar, memory_budget)."""
    from elsfast.reduce import ImageDictionary, PatchDictionary
    from elsfast.reduce.patches import group_sets

    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    N, C, H, W = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(2, 4)), draw(st.integers(2, 4))
    images = torch.randint(0, 256, (N, C, H, W), generator=g, dtype=torch.uint8)
    if draw(st.booleans()):
        images = images.double() / 127.5 - 1
    kind = draw(st.sampled_from(["is", "es", "patches"]))
    if kind == "patches":
        P, padding = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from(["zeros", "circular"]))
        sets = group_sets(H, W, P, padding, draw(st.sampled_from(["ls", "els"])))
        dictionary = PatchDictionary(images, P, padding, sets[draw(st.integers(0, len(sets) - 1))])
    else:
        dictionary = ImageDictionary(images, shifts=kind == "es")
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    M = draw(st.integers(0, 3))
    queries = torch.randn(dictionary.num_groups, M, dictionary.key_dim, generator=g, dtype=torch.float64)
    return queries.to(dtype), dictionary, draw(st.floats(0.02, 0.98)), draw(st.sampled_from([1, "1K", 512 << 20]))


def _reduce_reference(queries: torch.Tensor, dictionary, abar: float) -> torch.Tensor:
    """float64 brute force of SPEC section 5: softmax_j(-||q - a k_j||^2 / T) v_j, T = 2 (1 - abar)."""
    keys, values = dictionary.entries(0, dictionary.num_images, torch.float64)
    distances = torch.cdist(queries.double(), math.sqrt(abar) * keys) ** 2
    return torch.softmax(-distances / (2 * (1 - abar)), dim=-1) @ values


@QUICK
@given(reductions())
def test_valid_softmax_reduce_equals_the_float64_reference(problem):
    queries, dictionary, abar, budget = problem
    with no_hang():
        out = elsfast.softmax_reduce(queries, dictionary, abar=abar, memory_budget=budget).values
    assert out.shape == (*queries.shape[:2], dictionary.value_dim) and torch.isfinite(out).all()
    tol = 1e-9 if queries.dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.double(), _reduce_reference(queries, dictionary, abar), rtol=0, atol=tol)


def _bad_reductions():
    from elsfast.reduce import ImageDictionary

    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    q, d = torch.randn(1, 2, 16, generator=torch.Generator().manual_seed(3)), ImageDictionary(images)
    return [
        ("queries", (q * NAN, d), {}),
        ("queries", (q * 1e38, d), {}),
        ("queries", (q[0], d), {}),
        ("queries", (q.half(), d), {}),
        ("queries", (q.int(), d), {}),
        ("queries", (q.numpy(), d), {}),
        ("features", (q[:, :, :5], d), {}),
        ("groups", (q.expand(3, 2, 16), d), {}),
        ("dictionary", (q, images), {}),
        ("dictionary", (q, ImageDictionary(images.numpy())), {}),
        ("dictionary images", (q, ImageDictionary((images + 1) * 127.5)), {}),
        ("abar", (q, d), {"abar": 0.0}),
        ("abar", (q, d), {"abar": 1.5}),
        ("abar", (q, d), {"abar": NAN}),
        ("memory_budget", (q, d), {"memory_budget": 0}),
        ("memory_budget", (q, d), {"memory_budget": "lots"}),
        ("backend", (q, d), {"backend": "no-such-backend"}),
    ]


@QUICK
@given(st.sampled_from(range(len(_bad_reductions()))))
def test_invalid_softmax_reduce_arguments_raise_naming_them(index):
    name, args, broken = _bad_reductions()[index]
    kwargs = {"abar": 0.5, **broken}
    _expect_named_error(name, lambda: elsfast.softmax_reduce(*args, **kwargs))
