"""The softmax-over-dictionary core: one function (`softmax_reduce`), many backends.

`registry` says what each backend can run and how accurately, `policy` which one `auto` runs (exact backends
only), `caches` owns the in-memory caches derived from training sets.

Imports of other elsfast packages (tests/test_layout.py): `elsfast.common`, `elsfast.kernels`.
"""

from .api import DEFAULT_MEMORY_BUDGET, Reduction, softmax_reduce
from .caches import cache_info, clear_caches
from .cpu_backend import Cpu
from .dedup_backend import Dedup
from .dictionary import Dictionary, ImageDictionary, PatchDictionary
from .registry import Backend, BackendUnavailable, Tolerance, backend_names, backend_reasons, register_backend
from .shift_backend import Shifts
from .state import ReduceState
from .topk import TopK
from .triton_backend import Triton

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "Backend",
    "BackendUnavailable",
    "Cpu",
    "Dedup",
    "Dictionary",
    "ImageDictionary",
    "PatchDictionary",
    "ReduceState",
    "Reduction",
    "Shifts",
    "Tolerance",
    "TopK",
    "Triton",
    "backend_names",
    "backend_reasons",
    "cache_info",
    "clear_caches",
    "register_backend",
    "softmax_reduce",
]
