"""Backend registry and dispatch.

Each backend declares what it can run through `unsupported_reasons`, which returns readable strings (empty =
supported). `backend="auto"` walks the registry in priority order and takes the first exact backend with no
reasons; a backend asked for by name that cannot run raises `BackendUnavailable` with its reasons and never falls
back silently.
"""

from __future__ import annotations

import logging

import torch

from .dictionary import Dictionary
from .state import ReduceState

__all__ = [
    "Backend",
    "BackendUnavailable",
    "backend_names",
    "backend_reasons",
    "check_backend_name",
    "register_backend",
    "select_backend",
]

log = logging.getLogger("elsfast")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run this problem here."""


class Backend:
    """Base class of a reduction backend. Subclasses set `NAME`, `PRIORITY` (lower runs first under auto) and
    `EXACT`, and implement `reduce`."""

    NAME: str = ""
    PRIORITY: int = 100
    EXACT: bool = True

    def unsupported_reasons(self, queries: torch.Tensor, dictionary: Dictionary) -> list[str]:
        """Why this backend cannot run this problem here; empty when it can."""
        return []

    def reduce(
        self,
        queries: torch.Tensor,
        dictionary: Dictionary,
        *,
        abar: float,
        memory_budget: int,
        provenance: bool = False,
    ) -> tuple[ReduceState, int]:
        """Fold the whole dictionary into a state for `queries` `(G, M, D)`; returns (state, chunks used).
        With `provenance` the state also tracks the dominant entry and the entropy (see `ReduceState`)."""
        raise NotImplementedError


_REGISTRY: dict[str, Backend] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend to the registry under its `NAME`."""
    _REGISTRY[cls.NAME] = cls()
    return cls


def backend_names() -> list[str]:
    """Registered backend names in priority order."""
    return sorted(_REGISTRY, key=lambda name: _REGISTRY[name].PRIORITY)


def check_backend_name(name: str) -> None:
    """Raise ValueError for a name that is neither `auto` nor registered."""
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(backend_names())}")


def backend_reasons(queries: torch.Tensor, dictionary: Dictionary) -> dict[str, list[str]]:
    """For every registered backend, the reasons it cannot run this problem (empty list: it can)."""
    return {name: _REGISTRY[name].unsupported_reasons(queries, dictionary) for name in backend_names()}


def select_backend(name: str, queries: torch.Tensor, dictionary: Dictionary) -> Backend:
    """The backend to run: `name` itself (raising if it cannot run), or under `auto` the first exact one that can."""
    check_backend_name(name)
    if name != "auto":
        reasons = _REGISTRY[name].unsupported_reasons(queries, dictionary)
        if reasons:
            raise BackendUnavailable(f"backend {name!r} cannot run here: {'; '.join(reasons)}")
        return _REGISTRY[name]
    refused = {}
    for candidate in backend_names():
        backend = _REGISTRY[candidate]
        if not backend.EXACT:
            continue
        reasons = backend.unsupported_reasons(queries, dictionary)
        if not reasons:
            log.debug("auto backend: %s", candidate)
            return backend
        refused[candidate] = reasons
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in refused.items())
    raise BackendUnavailable(f"no backend can run this problem ({detail})")
