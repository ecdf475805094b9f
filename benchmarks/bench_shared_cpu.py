"""A sample on a CPU shared with other busy processes: how the OpenMP wait policy changes wall time and CPU time
(issue 15, item 10).

Each case runs `elsfast sample` (200 embedded MNIST digits padded to 32x32, 2 images, 6 steps, P = 5, ELS with
zero padding: the `cpu` kernel) in a fresh process, quiet or beside two processes that spin on the CPU, under
three wait policies of libgomp's idle threads:

- `libgomp-default`: `ELSFAST_OMP_SPIN=default` (elsfast leaves libgomp alone: 300,000 spin rounds);
- `elsfast-bounded`: nothing set (`import elsfast` sets `GOMP_SPINCOUNT=elsfast.common.threads.SPIN_COUNT`);
- `passive`: `OMP_WAIT_POLICY=passive` (sleep at once).

The JSON records each round's wall seconds and the child's user + system CPU seconds. Run with
`pytest benchmarks/bench_shared_cpu.py -m benchmark --benchmark-only --benchmark-enable
--benchmark-json=benchmarks/results/cpu-shared.json`.
"""

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {
    "libgomp-default": {"ELSFAST_OMP_SPIN": "default"},
    "elsfast-bounded": {},
    "passive": {"OMP_WAIT_POLICY": "passive"},
}
SPIN = "while True: pass"


def _environment(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "ELSFAST_OMP_SPIN")}
    return {**env, **POLICIES[policy], "PYTHONPATH": str(ROOT)}


def _sample_once(policy: str, out: Path) -> tuple[float, float]:
    """(wall seconds, user + system CPU seconds) of one `elsfast sample` in a child process."""
    argv = [sys.executable, "-m", "elsfast", "sample", "--limit", "200", "--pad-to", "32", "--n", "2",
            "--steps", "6", "--patch-size", "5", "--backend", "cpu", "-q", "--resume-from", "none",
            "--save", str(out)]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=_environment(policy), check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.mark.benchmark
@pytest.mark.parametrize("busy", [0, 2], ids=["quiet", "two-busy"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_sample_beside_busy_processes(benchmark, tmp_path, policy, busy):
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    walls, cpus = [], []
    try:
        time.sleep(0.5 if busy else 0.0)

        def run():
            wall, cpu = _sample_once(policy, tmp_path / f"x{len(walls)}.pt")
            walls.append(wall)
            cpus.append(cpu)

        benchmark.pedantic(run, rounds=3, iterations=1)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    benchmark.extra_info.update(
        {"policy": policy, "busy_processes": busy, "wall_s": walls, "cpu_s": cpus, "load_avg": os.getloadavg()}
    )
