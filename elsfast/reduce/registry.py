"""Backend registry and dispatch.

Each backend declares what it can run through `unsupported_reasons`, which returns readable strings (empty =
supported). `backend="auto"` walks the registry in priority order and takes the first backend whose
`auto_reasons` are empty (exact backends, and approximate ones that certify a tolerance); a backend asked for by
name that cannot run raises `BackendUnavailable` with its reasons and never falls back silently.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from .dictionary import Dictionary
from .state import ReduceState

__all__ = [
    "Backend",
    "BackendOutput",
    "BackendSpec",
    "BackendUnavailable",
    "backend_from_spec",
    "backend_names",
    "backend_reasons",
    "backend_spec",
    "check_backend_name",
    "register_backend",
    "select_backend",
]

log = logging.getLogger("elsfast")


class BackendOutput(NamedTuple):
    """What `Backend.reduce` returns: the folded state, the dictionary chunks streamed, and for approximate
    backends a bound on each query's neglected posterior mass `(G, M)` and how many queries they answered."""

    state: ReduceState
    chunks: int
    neglected: torch.Tensor | None = None
    approximate_queries: int = 0


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run this problem here."""


class Backend:
    """Base class of a reduction backend. Subclasses set `NAME` and `PRIORITY` (lower is tried first under
    auto) and implement `reduce`. A backend that is not exact says why `auto` should pass it by in
    `auto_reasons` (the default: "not exact" unless `EXACT`)."""

    NAME: str = ""
    PRIORITY: int = 100
    EXACT: bool = True

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        """Why this backend cannot run this problem here; empty when it can."""
        return []

    def auto_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        """Why `backend="auto"` should not pick this backend for this problem; empty when it may."""
        return self.unsupported_reasons(queries, dictionary) + ([] if self.EXACT else ["not exact"])

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

_REGISTRY: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend to the registry under its `NAME`."""
    _REGISTRY[cls.NAME] = cls()
    return cls


def backend_names() -> list[str]:
    """Registered backend names in priority order."""
    return sorted(_REGISTRY, key=lambda name: _REGISTRY[name].PRIORITY)


def check_backend_name(name: BackendSpec) -> None:
    """Raise ValueError for a name that is neither `auto` nor registered (a `Backend` instance is fine)."""
    if isinstance(name, Backend):
        return
    if not isinstance(name, str) or (name != "auto" and name not in _REGISTRY):
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(backend_names())}")


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
        check_backend_name(name)
        return type(_REGISTRY[name])(**spec)
    check_backend_name(spec)
    return spec


def backend_reasons(queries: torch.Tensor, dictionary: Dictionary) -> dict[str, list[str]]:
    """For every registered backend, the reasons it cannot run this problem (empty list: it can)."""
    return {name: _REGISTRY[name].unsupported_reasons(queries, dictionary) for name in backend_names()}


def select_backend(
    name: BackendSpec, queries: torch.Tensor, dictionary: Dictionary, *, exact_only: bool = False
) -> Backend:
    """The backend to run: `name` itself (a name or a configured instance; raising if it cannot run), or under
    `auto` the first registered backend whose `auto_reasons` are empty (and that is exact, with `exact_only`)."""
    check_backend_name(name)
    if name != "auto":
        backend = name if isinstance(name, Backend) else _REGISTRY[name]
        reasons = backend.unsupported_reasons(queries, dictionary)
        if reasons:
            raise BackendUnavailable(f"backend {backend.NAME!r} cannot run here: {'; '.join(reasons)}")
        return backend
    refused = {}
    for candidate in backend_names():
        backend = _REGISTRY[candidate]
        reasons = backend.auto_reasons(queries, dictionary) + (
            ["not exact"] if exact_only and not backend.EXACT else []
        )
        if not reasons:
            log.debug("auto backend: %s", candidate)
            return backend
        refused[candidate] = reasons
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in refused.items())
    raise BackendUnavailable(f"no backend can run this problem ({detail})")
