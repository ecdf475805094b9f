import os
import platform
import time
from pathlib import Path

import pytest
import torch


def device_name() -> str:
    """A readable name of the CPU (or GPU) the benchmark ran on, stored with every result."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@pytest.fixture(autouse=True)
def _record_device(benchmark):
    """Every benchmark in this folder stores the device it ran on and the torch version with its result."""
    benchmark.extra_info["device"] = device_name()
    benchmark.extra_info["torch"] = torch.__version__


@pytest.fixture(autouse=True)
def _within_deadline():
    """With ELSFAST_BENCH_DEADLINE (a Unix time, set by scripts/gpu_check.py a case's length before the end of its
    budget) a case that would start after it is skipped, so a run bounded from outside ends by itself and still
    writes its JSON."""
    deadline = os.environ.get("ELSFAST_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("the time budget of this benchmark run (ELSFAST_BENCH_DEADLINE) is spent")


def pytest_benchmark_update_machine_info(config, machine_info):
    """The GPU (if any) and the library versions in the JSON's machine_info, beside pytest-benchmark's CPU."""
    machine_info["device"] = device_name()
    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
