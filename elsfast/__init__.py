"""elsfast: fast, exact equivariant local score machines (Kamb & Ganguli, ICML 2025).

Importing elsfast imports nothing optional (no Triton, FAISS or compiled extension).
"""

from . import creativity, datasets, schedules
from .machine import MACHINES, ScoreMachine
from .provenance import Provenance
from .reduce import Cpu, Dedup, Shifts, TopK, Triton, backend_names, cache_info, softmax_reduce
from .reduce import clear_caches as _clear_reduction_caches
from .sampling import SampleTrace, ddim_sample, sample
from .scales import reference_scales

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
    "reference_scales",
    "sample",
    "schedules",
    "softmax_reduce",
]
