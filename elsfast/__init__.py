"""elsfast: fast, exact equivariant local score machines (Kamb & Ganguli, ICML 2025).

Importing elsfast imports nothing optional (no Triton, FAISS or compiled extension).
"""

from .common.threads import bound_openmp_spin, kernel_threads, limit_threads, set_num_threads

bound_openmp_spin()  # before torch loads libgomp: idle OpenMP threads spin briefly, then sleep (elsfast.common.threads)

from . import datasets  # noqa: E402
from .common import schedules  # noqa: E402
from .common.provenance import Provenance  # noqa: E402
from .common.scales import reference_scales  # noqa: E402
from .machine import MACHINES, ScoreMachine  # noqa: E402
from .reduce import Cpu, Dedup, Shifts, TopK, Triton, backend_names, cache_info, softmax_reduce  # noqa: E402
from .reduce import clear_caches as _clear_reduction_caches  # noqa: E402
from .research import creativity  # noqa: E402
from .sampling import SampleTrace, ddim_sample, sample  # noqa: E402

__version__ = "0.1.0"


def clear_caches() -> int:
    """Drop every in-memory cache elsfast keeps (dedup tables, top-k indexes, decoded datasets); returns how many
    reduction-cache entries were dropped. Disk caches are left alone. `cache_info()` lists the caches."""
    datasets.clear_memory_cache()
    return _clear_reduction_caches()


__all__ = [
    "MACHINES",
    "Cpu",
    "Dedup",
    "Provenance",
    "SampleTrace",
    "ScoreMachine",
    "Shifts",
    "TopK",
    "Triton",
    "__version__",
    "backend_names",
    "cache_info",
    "clear_caches",
    "creativity",
    "datasets",
    "ddim_sample",
    "kernel_threads",
    "limit_threads",
    "reference_scales",
    "sample",
    "schedules",
    "set_num_threads",
    "softmax_reduce",
]
