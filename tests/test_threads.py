"""One place decides the compiled kernels' threads, and idle OpenMP threads do not spin for long (issue 15,
item 10)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elsfast
from elsfast.cli import main
from elsfast.common import threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore():
    yield
    threads.set_num_threads(None)


def test_precedence_explicit_then_environment_then_torch(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 64)
    monkeypatch.delenv("ELSFAST_NUM_THREADS", raising=False)
    assert threads.kernel_threads() == torch.get_num_threads()
    monkeypatch.setenv("ELSFAST_NUM_THREADS", "3")
    assert threads.kernel_threads() == 3
    threads.set_num_threads(5)
    assert threads.kernel_threads() == 5
    threads.set_num_threads(None)
    assert threads.kernel_threads() == 3


def test_never_more_threads_than_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    threads.set_num_threads(16)
    assert threads.kernel_threads() == 2


def test_available_cpus_respects_the_affinity_mask():
    assert 1 <= threads.available_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError)])
def test_bad_thread_counts_are_refused_naming_them(value, error):
    with pytest.raises(error, match="threads"):
        threads.set_num_threads(value)
    with pytest.raises(error, match="threads"):
        elsfast.sample(torch.zeros(2, 1, 4, 4), n=1, steps=2, threads=value, progress=False)


def test_a_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("ELSFAST_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="ELSFAST_NUM_THREADS must be a positive integer, got 'many'"):
        threads.kernel_threads()


def test_limit_threads_sets_and_restores_both_counts():
    before = torch.get_num_threads()
    with threads.limit_threads(1):
        assert torch.get_num_threads() == 1 and threads.kernel_threads() == 1
    assert torch.get_num_threads() == before


def test_sample_with_threads_gives_the_same_result_and_restores_torch():
    train = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    m = elsfast.ScoreMachine(train, dtype=torch.float64)
    before = torch.get_num_threads()
    one = elsfast.sample(m, n=2, steps=4, seed=0, threads=1, progress=False)
    torch.testing.assert_close(one, elsfast.sample(m, n=2, steps=4, seed=0, progress=False), rtol=0, atol=1e-12)
    assert torch.get_num_threads() == before


def test_the_kernels_use_the_decided_count(monkeypatch, cpu_ext):
    from elsfast.reduce import cpu_backend

    seen = []
    monkeypatch.setattr(cpu_backend, "kernel_threads", lambda: seen.append(1) or 1)
    m = elsfast.ScoreMachine(torch.rand(8, 1, 8, 8) * 2 - 1, backend="cpu")
    m.denoise(torch.randn(1, 1, 8, 8), 0.5, 3)
    assert seen


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, str(threads.SPIN_COUNT)),
        ({"OMP_WAIT_POLICY": "active"}, None),
        ({"GOMP_SPINCOUNT": "7"}, "7"),
        ({"ELSFAST_OMP_SPIN": "default"}, None),
    ],
)
def test_the_spin_bound_respects_what_the_user_set(monkeypatch, extra, expected):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ELSFAST_OMP_SPIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, "torch")  # as before `import torch`; restored afterwards
    threads.bound_openmp_spin()
    assert os.environ.get("GOMP_SPINCOUNT") == expected


@pytest.mark.parametrize(
    ("code", "expected"), [("import elsfast, os", str(threads.SPIN_COUNT)), ("import torch, elsfast, os", "None")]
)
def test_import_elsfast_first_bounds_the_spin_and_torch_first_cannot(code, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ELSFAST_OMP_SPIN")}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; print(os.environ.get('GOMP_SPINCOUNT'))"],
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected


def test_cli_threads_flag(tmp_path, capsys):
    argv = ["sample", "--limit", "10", "--n", "1", "--steps", "2", "-q", "--out", str(tmp_path / "g.png")]
    assert main([*argv, "--threads", "1"]) == 0
    assert main([*argv, "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
