"""Which backend runs: `backend="auto"`'s rule list, and the dispatch of named and automatic requests.

`auto` only ever runs exact backends. It walks `RULES` in order and takes the first rule that applies to the
problem and whose backend can run it (no `unsupported_reasons`); approximation (top-k) runs only when asked for by
name (`backend="topk"`, or a configured `TopK(...)`). Each rule says when its backend beats the ones after it and
where that was measured.

    1  triton  CUDA tensors                                  estimated from the compiled code (no GPU measurement yet)
    2  cuda    CUDA tensors (where triton cannot run)         estimated
    3  dedup   patch dictionaries, P <= 7, groups of >= 2^20   bench_cpu.py::test_dedup_vs_exact_kernels
               entries (groups repeating a key < 1.5x: cpu)
    4  shifts  zero-padded ELS, P >= 7, > 1 position a group  bench_cpu.py::test_shift_kernel_vs_cpu_kernel
    5  cpu     patch dictionaries on CPU tensors              bench_cpu.py::test_cpu_kernel_vs_torch
    6  torch   always                                         the portable path (float64, IS/ES, any device)

A backend may refuse late, from `reduce`, a condition it can only check while reducing (`shifts`: the queries must
be the patches of whole images); `auto` then moves on to the next rule, and the report names what ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .cpu_backend import Cpu
from .cuda_backend import Cuda
from .dedup_backend import Dedup
from .dictionary import Dictionary, PatchDictionary
from .registry import Backend, BackendOutput, BackendUnavailable, describe_inputs, resolve_named
from .shift_backend import Shifts
from .torch_backend import TorchBackend
from .triton_backend import Triton

__all__ = [
    "DEDUP_MAX_PATCH_SIZE",
    "DEDUP_MIN_DUPLICATION",
    "DEDUP_MIN_ENTRIES",
    "RULES",
    "SHIFTS_MIN_PATCH_SIZE",
    "Rule",
    "auto_candidates",
    "run",
]

log = logging.getLogger("elsfast")

# Deduplication pays where keys repeat: all 60,000 MNIST digits repeat a patch 6.9x / 3.6x / 2.5x / 1.9x at
# P = 3 / 5 / 7 / 9, and dedup then runs at 5.1x / 3.0x / 2.0x the cpu kernel at P = 3 / 5 / 7 but at 0.75x the
# shift kernel at P = 9 (10,000 digits, benchmarks/bench_cpu.py::test_dedup_vs_exact_kernels,
# benchmarks/results/cpu-dedup.json; machine and date in docs/performance.md). Below 2^20 entries a group costs
# more to deduplicate than to reduce; groups whose keys repeat less than 1.5x (natural RGB images: CIFAR-10 1.004x
# at P = 3) run on the cpu kernel.
DEDUP_MAX_PATCH_SIZE = 7
DEDUP_MIN_ENTRIES = 1 << 20
DEDUP_MIN_DUPLICATION = 1.5

# The shift kernel's box sums cost 2P operations a pair instead of P^2: 0.82x the cpu kernel at P = 5, 1.24x at
# P = 7, 2.1x at P = 11, 3.1x at P = 15 (1,000 MNIST digits, AVX-512,
# benchmarks/bench_cpu.py::test_shift_kernel_vs_cpu_kernel, benchmarks/results/cpu-kernel.json; docs/performance.md).
SHIFTS_MIN_PATCH_SIZE = 7


@dataclass(frozen=True)
class Rule:
    """`backend` (configured as `auto` runs it) is preferred to the rules after it when `applies(queries,
    dictionary)` returns None (else it returns why the rule does not apply); `taken_when` and `evidence` say so in
    words (`elsfast info`, docs)."""

    backend: Backend
    applies: Callable[[torch.Tensor, Dictionary], str | None]
    taken_when: str
    evidence: str


def _on_cuda(queries: torch.Tensor, dictionary: Dictionary) -> str | None:
    return None if queries.device.type == "cuda" else "the queries are not on a CUDA device"


def _dedup_pays(queries: torch.Tensor, dictionary: Dictionary) -> str | None:
    if not isinstance(dictionary, PatchDictionary):
        return "not a patch dictionary"
    if dictionary.patch_size > DEDUP_MAX_PATCH_SIZE:
        return f"patch size {dictionary.patch_size} > {DEDUP_MAX_PATCH_SIZE}: patches rarely repeat"
    if dictionary.size < DEDUP_MIN_ENTRIES:
        return f"{dictionary.size:,} entries a group < {DEDUP_MIN_ENTRIES:,}: deduplicating costs more than it saves"
    return None


def _shifts_pay(queries: torch.Tensor, dictionary: Dictionary) -> str | None:
    if not isinstance(dictionary, PatchDictionary) or dictionary.padding != "zeros":
        return "not a zero-padded patch dictionary"
    if dictionary.patch_size < SHIFTS_MIN_PATCH_SIZE:
        return f"patch size {dictionary.patch_size} < {SHIFTS_MIN_PATCH_SIZE}: the cpu kernel is as fast"
    if dictionary.entries_per_image == 1:
        return "one position a group (LS): no displacement is shared"
    return None


def _always(queries: torch.Tensor, dictionary: Dictionary) -> None:
    return None


RULES: tuple[Rule, ...] = (
    Rule(Triton(), _on_cuda, "CUDA tensors", "estimated from the compiled sm_90 code; not yet measured on a GPU"),
    Rule(Cuda(), _on_cuda, "CUDA tensors (where triton is missing)", "estimated; one query per thread"),
    Rule(
        Dedup(min_duplication=DEDUP_MIN_DUPLICATION),
        _dedup_pays,
        f"patch dictionaries with P <= {DEDUP_MAX_PATCH_SIZE} and >= {DEDUP_MIN_ENTRIES:,} entries a group "
        f"(groups repeating a key < {DEDUP_MIN_DUPLICATION}x run on cpu)",
        "MNIST 5.1x/3.0x/2.0x the cpu kernel at P = 3/5/7 (bench_cpu.py::test_dedup_vs_exact_kernels)",
    ),
    Rule(
        Shifts(),
        _shifts_pay,
        f"zero-padded ELS with P >= {SHIFTS_MIN_PATCH_SIZE}",
        "1.24x the cpu kernel at P = 7, 3.1x at P = 15 (bench_cpu.py::test_shift_kernel_vs_cpu_kernel)",
    ),
    Rule(Cpu(), _always, "patch dictionaries on CPU tensors", "2-3.5x torch (bench_cpu.py::test_cpu_kernel_vs_torch)"),
    Rule(TorchBackend(), _always, "always", "the portable path; float64, IS/ES, any device"),
)


def auto_candidates(
    queries: torch.Tensor, dictionary: Dictionary, refused: dict[str, list[str]] | None = None
) -> Iterator[Backend]:
    """The backends `auto` may run for this problem, most preferred first; each rule passed by, with its reasons,
    goes into `refused` (when given)."""
    for rule in RULES:
        why = rule.applies(queries, dictionary)
        reasons = [why] if why is not None else rule.backend.unsupported_reasons(queries, dictionary)
        if not reasons:
            yield rule.backend
        elif refused is not None:
            refused[rule.backend.NAME] = reasons


def _none_can_run(queries: torch.Tensor, dictionary: Dictionary, refused: dict[str, list[str]]) -> BackendUnavailable:
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in refused.items())
    return BackendUnavailable(f"no backend can run {describe_inputs(queries, dictionary)} ({detail})")


def run(
    backend: Backend | None,
    queries: torch.Tensor,
    dictionary: Dictionary,
    *,
    abar: float,
    memory_budget: int,
    provenance: bool = False,
) -> tuple[Backend, BackendOutput]:
    """Reduce with `backend` (a backend asked for by name or instance: `registry.resolve_spec`), or under None
    (`auto`) with the first capable backend of `RULES`: the backend that ran and its output. Under `auto` a late
    refusal moves on to the next rule; a named backend's refusal propagates. An approximate backend gets the exact
    reduction it falls back to (`auto`) as its `exact` argument. The one selection path of every reduction."""
    kwargs = {"abar": abar, "memory_budget": memory_budget, "provenance": provenance}
    if backend is not None:
        backend = resolve_named(backend, queries, dictionary)
        exact = {} if backend.EXACT else {"exact": _run_auto}
        return backend, backend.reduce(queries, dictionary, **kwargs, **exact)
    return _run_auto(queries, dictionary, **kwargs)


def _run_auto(
    queries: torch.Tensor, dictionary: Dictionary, *, abar: float, memory_budget: int, provenance: bool
) -> tuple[Backend, BackendOutput]:
    refused: dict[str, list[str]] = {}
    for backend in auto_candidates(queries, dictionary, refused):
        try:
            out = backend.reduce(queries, dictionary, abar=abar, memory_budget=memory_budget, provenance=provenance)
        except BackendUnavailable as refusal:
            log.debug("auto: %s refused late (%s)", backend.NAME, refusal)
            refused[backend.NAME] = refusal.reasons or [str(refusal)]
            continue
        log.debug("auto backend: %s", backend.NAME)
        return backend, out
    raise _none_can_run(queries, dictionary, refused)
