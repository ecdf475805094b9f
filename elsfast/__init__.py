"""elsfast: fast, exact equivariant local score machines (Kamb & Ganguli, ICML 2025).

Importing elsfast imports nothing optional (no Triton, FAISS or compiled extension).
"""

from . import datasets, schedules
from .machine import MACHINES, ScoreMachine
from .reduce import backend_names, softmax_reduce
from .sampling import ddim_sample, sample
from .scales import reference_scales

__version__ = "0.1.0"

__all__ = [
    "MACHINES",
    "ScoreMachine",
    "__version__",
    "backend_names",
    "datasets",
    "ddim_sample",
    "reference_scales",
    "sample",
    "schedules",
    "softmax_reduce",
]
