"""`Triton(tune=True)`: every configuration it may choose computes the reduction within the backend's declared
accuracy (run here in Triton's interpreter), the fastest is kept per kind of problem, in memory and in the disk
cache, and nothing is timed twice. The timings themselves need a GPU; here a fake timer decides."""

import json

import pytest
import torch
from problems import logit_range

from elsfast.reduce import PatchDictionary, Triton, softmax_reduce, tuning
from elsfast.reduce.patches import extract_patches, group_sets

pytestmark = pytest.mark.interpreter
kernels = pytest.importorskip("elsfast.kernels.softmax_reduce", reason="triton is not installed")

ABAR = 0.6


def _problem(uint8: bool):
    g = torch.Generator().manual_seed(5)
    train = torch.randint(0, 256, (9, 1, 6, 5), generator=g, dtype=torch.uint8)
    pixels = train.float() / 127.5 - 1
    x = ABAR**0.5 * pixels[[1, 4]] + (1 - ABAR) ** 0.5 * torch.randn(2, 1, 6, 5, generator=g)
    positions = group_sets(6, 5, 3, "zeros", "els")[0]
    dictionary = PatchDictionary(train if uint8 else pixels, 3, "zeros", positions)
    queries = extract_patches(x, 3, "zeros", positions).reshape(positions.shape[0], -1, 9)
    return queries, dictionary, logit_range(x, pixels, ABAR, 3, "els")


class FakeTimer:
    """Times nothing: the `fastest`-th candidate of each choice takes 1 s, the others 2 s; counts its calls."""

    def __init__(self, fastest: int):
        self.fastest, self.calls = fastest, 0

    def __call__(self, call, device):
        self.calls += 1
        return 1.0 if self.calls - 1 == self.fastest else 2.0


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh disk cache and no choice in memory, before and after."""
    monkeypatch.setenv("ELSFAST_CACHE", str(tmp_path / "cache"))
    tuning.clear_tuning()
    yield tmp_path / "cache"
    tuning.clear_tuning()


def _launched(monkeypatch) -> list[dict]:
    configs = []
    launch = kernels.launch_softmax_reduce

    def spy(*args, config, **kwargs):
        configs.append(config)
        return launch(*args, config=config, **kwargs)

    monkeypatch.setattr(kernels, "launch_softmax_reduce", spy)
    return configs


@pytest.mark.parametrize("uint8", [True, False], ids=["uint8", "float32"])
def test_every_candidate_agrees_with_the_float64_reduction(uint8, cache, monkeypatch):
    queries, dictionary, L = _problem(uint8)
    exact = softmax_reduce(queries.double(), dictionary, abar=ABAR, backend="torch", provenance=True)
    backend = Triton(tune=True)
    bound = backend.accuracy(torch.float32).bound(torch.float32, L, dictionary.key_dim)
    options = dict(
        is_uint8=uint8,
        provenance=True,
        dot_precision="fp16x2" if uint8 else "tf32x3",
        block_e=16,
        fast_exp2=False,
    )
    candidates = kernels.tuning_space(9, 1, **options)
    assert len(candidates) >= 4
    launched = _launched(monkeypatch)
    for i in range(len(candidates)):
        (cache / tuning.TUNING_FILE).unlink(missing_ok=True)
        tuning.clear_tuning()
        timer = FakeTimer(fastest=i)
        monkeypatch.setattr("elsfast.reduce.triton_backend.time_call", timer)
        r = softmax_reduce(queries, dictionary, abar=ABAR, backend=backend, provenance=True)
        assert timer.calls == len(candidates)
        assert launched[-1] == candidates[i], i
        deviation = (r.values.double() - exact.values).abs().max().item()
        assert deviation <= bound, (i, candidates[i]["BLOCK_M"], candidates[i]["BLOCK_N"], deviation, bound)
        assert torch.equal(r.best, exact.best), i


def test_a_choice_is_timed_once_and_kept_in_memory_and_on_disk(cache, monkeypatch):
    queries, dictionary, _ = _problem(True)
    timer = FakeTimer(fastest=2)
    monkeypatch.setattr("elsfast.reduce.triton_backend.time_call", timer)
    launched = _launched(monkeypatch)
    backend = Triton(tune=True)
    softmax_reduce(queries, dictionary, abar=ABAR, backend=backend)
    timed = timer.calls
    chosen = launched[-1]
    softmax_reduce(queries, dictionary, abar=ABAR, backend=backend)
    assert timer.calls == timed and launched[-1] == chosen  # the same kind of problem: nothing timed

    saved = json.loads((cache / tuning.TUNING_FILE).read_text())
    assert list(saved.values()) == [chosen]
    tuning.clear_tuning()  # a new process: the disk cache answers
    softmax_reduce(queries, dictionary, abar=ABAR, backend=backend)
    assert timer.calls == timed and launched[-1] == chosen

    # a saved configuration that is no longer a candidate (another version) is timed again
    key = next(iter(saved))
    (cache / tuning.TUNING_FILE).write_text(json.dumps({key: {**chosen, "BLOCK_M": 512}}))
    tuning.clear_tuning()
    softmax_reduce(queries, dictionary, abar=ABAR, backend=backend)
    assert timer.calls == 2 * timed

    # another kind of problem (provenance) is timed on its own
    softmax_reduce(queries, dictionary, abar=ABAR, backend=backend, provenance=True)
    assert timer.calls == 3 * timed
    assert len(json.loads((cache / tuning.TUNING_FILE).read_text())) == 2


def test_candidates_are_timed_on_the_leading_images(cache, monkeypatch):
    """Each candidate is timed on all the queries against the leading training images (about TUNING_PAIRS
    pairs), the chosen one then runs on the whole dictionary."""
    queries, dictionary, _ = _problem(True)
    G, M, _ = queries.shape
    monkeypatch.setattr("elsfast.reduce.triton_backend.TUNING_PAIRS", 2 * G * M * dictionary.entries_per_image)
    rows = []
    launch = kernels.launch_softmax_reduce

    def spy(q, images, *args, **kwargs):
        rows.append(images.shape[0])
        return launch(q, images, *args, **kwargs)

    monkeypatch.setattr(kernels, "launch_softmax_reduce", spy)
    monkeypatch.setattr("elsfast.reduce.triton_backend.time_call", lambda call, device: (call(), 1.0)[1])
    softmax_reduce(queries, dictionary, abar=ABAR, backend=Triton(tune=True))
    assert len(rows) > 2 and rows[:-1] == [2] * (len(rows) - 1) and rows[-1] == dictionary.num_images == 9


def test_no_disk_cache_when_it_is_off(tmp_path, monkeypatch):
    monkeypatch.setenv("ELSFAST_CACHE", "off")
    monkeypatch.chdir(tmp_path)
    tuning.clear_tuning()
    queries, dictionary, _ = _problem(True)
    monkeypatch.setattr("elsfast.reduce.triton_backend.time_call", FakeTimer(fastest=0))
    softmax_reduce(queries, dictionary, abar=ABAR, backend=Triton(tune=True))
    assert list(tmp_path.iterdir()) == []
    tuning.clear_tuning()


def test_tune_excludes_fixed_tiles():
    with pytest.raises(ValueError, match="tune"):
        Triton(tune=True, block_m=64)
    assert Triton(tune=True).options()["tune"] is True


@pytest.mark.parametrize("precision", ["fp16x2", "tf32", "tf32x3", "ieee"])
@pytest.mark.parametrize(("D", "E"), [(9, 1), (27, 3), (121, 1), (363, 3), (675, 3)])
def test_tuning_space_fits_shared_memory_without_duplicates(D, E, precision):
    limit = 99 * 1024  # sm_86/89, the smallest limit a launch passes
    space = kernels.tuning_space(
        D, E, is_uint8=True, provenance=True, dot_precision=precision, block_e=16, shared_memory_limit=limit
    )
    assert space[0] == kernels.launch_config(
        D, E, is_uint8=True, provenance=True, dot_precision=precision, block_e=16, shared_memory_limit=limit
    )
    assert all(kernels.shared_memory_estimate(c) <= limit for c in space)
    assert len({json.dumps(c, sort_keys=True) for c in space}) == len(space)
    assert {c["num_warps"] for c in space} == set(kernels.TUNING_WARPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tuning_on_a_gpu_times_every_candidate_and_keeps_a_correct_one(cache):
    """On a device: real timings (CUDA events), the chosen configuration within the declared accuracy."""
    queries, dictionary, L = _problem(True)
    exact = softmax_reduce(queries.double(), dictionary, abar=ABAR, backend="torch")
    dictionary = PatchDictionary(dictionary.images.cuda(), 3, "zeros", dictionary.positions)
    backend = Triton(tune=True)
    r = softmax_reduce(queries.cuda(), dictionary, abar=ABAR, backend=backend)
    deviation = (r.values.double().cpu() - exact.values).abs().max().item()
    assert deviation <= backend.accuracy(torch.float32).bound(torch.float32, L, dictionary.key_dim)
    assert len(json.loads((cache / tuning.TUNING_FILE).read_text())) == 1
