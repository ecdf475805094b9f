import platform
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
