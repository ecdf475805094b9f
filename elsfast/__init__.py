"""elsfast: fast, exact equivariant local score machines (Kamb & Ganguli, ICML 2025).

Importing elsfast imports nothing optional (no Triton, FAISS or compiled extension).
"""

from . import creativity, datasets, schedules
from .machine import MACHINES, ScoreMachine
from .provenance import Provenance
from .reduce import Cpu, Dedup, Shifts, TopK, Triton, backend_names, softmax_reduce
from .sampling import SampleTrace, ddim_sample, sample
from .scales import reference_scales

__version__ = "0.1.0"

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
    "creativity",
    "datasets",
    "ddim_sample",
    "reference_scales",
    "sample",
    "schedules",
    "softmax_reduce",
]
