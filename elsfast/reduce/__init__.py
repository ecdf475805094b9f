"""The softmax-over-dictionary core: one function (`softmax_reduce`), many backends."""

from .api import DEFAULT_MEMORY_BUDGET, Reduction, softmax_reduce
from .cpu_backend import Cpu
from .dedup_backend import Dedup
from .dictionary import Dictionary, ImageDictionary, PatchDictionary
from .registry import Backend, BackendUnavailable, backend_names, backend_reasons, register_backend
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
    "TopK",
    "Triton",
    "backend_names",
    "backend_reasons",
    "register_backend",
    "softmax_reduce",
]
