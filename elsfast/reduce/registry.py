"""Backend registry: what each backend *can* run, and how closely it agrees with the float64 reference.

A backend declares
- `NAME`, and `EXACT` (False only for backends that approximate the softmax, e.g. top-k);
- `LIMITS`: the conditions it needs, each a short text; `unsupported_reasons(queries, dictionary)` returns one
  reason per unmet condition, each starting with that condition's text (`Backend.refuse`). The check is cheap
  and free of side effects: no table builds, no allocations of the problem's size. A condition that can only be
  checked while reducing (the shift kernel verifies that the queries are whole-image patches) is declared all
  the same and raised as `BackendUnavailable` from `reduce` before any work;
- `accuracy(dtype)`: its agreement with the float64 reference (`Tolerance`).

Which capable backend `backend="auto"` prefers is not a property of a backend: it is the rule list of
`elsfast.reduce.policy`. A backend asked for by name that cannot run raises `BackendUnavailable` with its reasons
and the problem's description (`describe_inputs`), and never falls back silently. A backend spec (a name, "auto"
or a configured backend) is checked once per call, by `resolve_spec`.

An approximate backend (`EXACT = False`) answers some queries exactly: its `reduce` takes the exact reduction as
the keyword `exact` (an `ExactReduce`, given by `policy.run`), so that no backend calls the dispatcher itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch

from .dictionary import Dictionary, ImageDictionary, PatchDictionary
from .state import ReduceState

__all__ = [
    "Backend",
    "BackendOutput",
    "BackendSpec",
    "BackendUnavailable",
    "ExactReduce",
    "Tolerance",
    "backend_from_spec",
    "backend_names",
    "backend_reasons",
    "backend_spec",
    "check_backend_name",
    "describe_inputs",
    "get_backend",
    "register_backend",
    "resolve_named",
    "resolve_spec",
]


class BackendOutput(NamedTuple):
    """What `Backend.reduce` returns: the folded state, the dictionary chunks streamed, and for approximate
    backends a bound on each query's neglected posterior mass `(G, M)` and how many queries they answered.

    `backends`: per group, the name of what ran (`"a+b"` where a group's queries ran on two backends, e.g. top-k
    and its exact fallback); None means this backend's `NAME` for every group. `pairs`: the query-entry pairs
    actually scored; None means every pair of the exact problem (G * M * entries)."""

    state: ReduceState
    chunks: int
    neglected: torch.Tensor | None = None
    approximate_queries: int = 0
    backends: tuple[str, ...] | None = None
    pairs: int | None = None


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run this problem here; `reasons` lists why (each starting with
    one of the backend's `LIMITS`)."""

    def __init__(self, message: str, reasons: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reasons = list(reasons)


class Tolerance(NamedTuple):
    """A backend's declared agreement with the float64 reference for queries of one dtype. A logit is off by at most
    `Delta = (per_logit + per_feature * D) * eps(dtype) * L` nats, where D is the key dimension and L the largest
    logit magnitude the problem allows, `max (2a |q.k| + a^2 |k|^2) / T` (nats; SPEC section 5); values in [-1, 1]
    then move by at most `(e^(2 Delta) - 1) / 2` (~ Delta; docs/design.md, "Error bounds of the fused kernels"), and
    every output value is within that plus `absolute` (the rounding of the sums) of the reference. Approximate
    backends add twice the neglected posterior mass they certify."""

    per_logit: float
    absolute: float
    per_feature: float = 0.0

    def bound(self, dtype: torch.dtype, logit_range: float, key_dim: int | None = None) -> float:
        """The largest allowed deviation for queries of `dtype` on a problem of key dimension `key_dim` whose logits
        span `logit_range` nats; `key_dim` is needed when the tolerance grows with it (`per_feature`)."""
        if self.per_feature and key_dim is None:
            raise ValueError("this tolerance grows with the key dimension: pass key_dim")
        delta = (self.per_logit + self.per_feature * (key_dim or 0)) * torch.finfo(dtype).eps * logit_range
        return min(2.0, math.expm1(2.0 * delta) / 2.0) + self.absolute


# A logit is a dot product of D terms in the queries' dtype; its rounding error is a few eps * L, a weight moves by
# the same relative amount and the values lie in [-1, 1]. Running sums kept in fp64 (the compiled kernels) or fp32.
FP_TOLERANCES = {torch.float32: Tolerance(8.0, 1e-6), torch.float64: Tolerance(8.0, 1e-9)}


class Backend:
    """Base class of a reduction backend. Subclasses set `NAME`, `LIMITS` and implement `reduce` (and
    `unsupported_reasons` when they have limits)."""

    NAME: str = ""
    EXACT: bool = True
    LIMITS: ClassVar[dict[str, str]] = {}

    def refuse(self, limit: str, detail: str = "") -> str:
        """The reason for the unmet condition `limit` (a key of `LIMITS`), with `detail` about this problem."""
        text = self.LIMITS[limit]
        return f"{text} ({detail})" if detail else text

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        """Why this backend cannot run this problem here (one `refuse` reason per unmet limit); empty when it can.
        Cheap: it reads shapes, dtypes, devices and the dictionary's description, never the data."""
        return []

    def accuracy(self, dtype: torch.dtype) -> Tolerance:
        """The declared agreement with the float64 reference for queries of `dtype` (`Tolerance`)."""
        return FP_TOLERANCES[dtype]

    def options(self) -> dict:
        """The backend's options, JSON-ready (`backend_from_spec` rebuilds it from `{"name": NAME, **options}`)."""
        return {}

    def reduce(
        self,
        queries: torch.Tensor,
        dictionary: Dictionary,
        *,
        abar: float,
        memory_budget: int,
        provenance: bool = False,
    ) -> BackendOutput:
        """Fold the whole dictionary into a state for `queries` `(G, M, D)`.
        With `provenance` the state also tracks the dominant entry and the entropy (see `ReduceState`)."""
        raise NotImplementedError


BackendSpec = str | Backend

# The exact reduction an approximate backend falls back to: (queries, dictionary, *, abar, memory_budget,
# provenance) -> (the backend that ran, its output).
ExactReduce = Callable[..., tuple[Backend, BackendOutput]]

_REGISTRY: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend (its default configuration) to the registry under its `NAME`."""
    _REGISTRY[cls.NAME] = cls()
    return cls


def backend_names() -> list[str]:
    """Registered backend names, in registration order (`auto`'s order is `elsfast.reduce.policy.RULES`)."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The registered backend `name` in its default configuration."""
    backend = resolve_spec(name)
    if backend is None:
        raise ValueError("'auto' is a rule list, not a backend (elsfast.reduce.policy)")
    return backend


def resolve_spec(spec: BackendSpec) -> Backend | None:
    """The backend a spec names (its default configuration for a name, the instance itself for a configured one),
    None for "auto"; ValueError for a name that is neither "auto" nor registered. The one check of a spec."""
    if isinstance(spec, Backend):
        return spec
    if not isinstance(spec, str) or (spec != "auto" and spec not in _REGISTRY):
        raise ValueError(f"unknown backend {spec!r}; known: auto, {', '.join(backend_names())}")
    return None if spec == "auto" else _REGISTRY[spec]


def check_backend_name(name: BackendSpec) -> None:
    """Raise ValueError for a name that is neither `auto` nor registered (a `Backend` instance is fine): for
    arguments checked before any work (`ScoreMachine`, the CLI)."""
    resolve_spec(name)


def backend_spec(backend: BackendSpec) -> str | dict:
    """JSON-ready form of a backend argument: the name, or `{"name": ..., **options}` for a configured one."""
    if isinstance(backend, Backend):
        return {"name": backend.NAME, **backend.options()}
    return backend


def backend_from_spec(spec: str | dict) -> BackendSpec:
    """Inverse of `backend_spec`."""
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name")
        if resolve_spec(name) is None:
            raise ValueError("a configured backend needs a registered name, got 'auto'")
        return type(_REGISTRY[name])(**spec)
    resolve_spec(spec)
    return spec


def backend_reasons(queries: torch.Tensor, dictionary: Dictionary) -> dict[str, list[str]]:
    """For every registered backend, the reasons it cannot run this problem (empty list: it can)."""
    return {name: _REGISTRY[name].unsupported_reasons(queries, dictionary) for name in backend_names()}


def describe_inputs(queries: torch.Tensor, dictionary: Dictionary) -> str:
    """The problem in words, for refusals (as xformers' `_format_inputs_description`): the queries' shape, dtype
    and device; the dictionary's machine (LS/ELS patches with their size and padding, IS or ES whole images), its
    groups, entries and dimensions, and the training images' shape and dtype."""
    G, M, D = queries.shape
    if isinstance(dictionary, PatchDictionary):
        kind = f"patch dictionary (LS/ELS) P={dictionary.patch_size} {dictionary.padding} padding"
    elif isinstance(dictionary, ImageDictionary):
        kind = f"image dictionary ({'ES: circular translates' if dictionary.shifts else 'IS'})"
    else:
        kind = type(dictionary).__name__
    images = dictionary.images
    return (
        f"queries (G={G}, M={M}, D={D}) {str(queries.dtype)[6:]} on {queries.device.type}; {kind}, "
        f"{dictionary.num_groups} groups x {dictionary.size} entries, D={dictionary.key_dim} E={dictionary.value_dim}, "
        f"training images {list(images.shape)} {str(images.dtype)[6:]} on {images.device.type}"
    )


def resolve_named(backend: Backend, queries: torch.Tensor, dictionary: Dictionary) -> Backend:
    """`backend` (asked for by name or instance), raising `BackendUnavailable` with its reasons and the problem's
    description when it cannot run this problem."""
    reasons = backend.unsupported_reasons(queries, dictionary)
    if reasons:
        raise BackendUnavailable(
            f"backend {backend.NAME!r} cannot run {describe_inputs(queries, dictionary)}: {'; '.join(reasons)}",
            reasons,
        )
    return backend
