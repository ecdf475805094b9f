"""Exact gradients of the core reduction with respect to its queries: a second streaming pass, as in
FlashAttention's backward. Shape letters are those of `elsfast.reduce.api`.

For a query q with logits l_j = -|q - a k_j|^2 / T over the entries j of its group (a = sqrt(abar),
T = 2 (1 - abar)), the reduction is out = sum_j w_j v_j with w = softmax(l). Its Jacobian is a covariance under
the same weights,

    d out / d q = (2a/T) Cov_w(v, k)     (E x D; the -|q|^2 / T term is the same for every j and cancels),

and the vector-Jacobian product for an upstream gradient g `(E,)` is

    g^T d out / d q = (2a/T) sum_j w_j (g.v_j - g.out) k_j,

since sum_j w_j (g.v_j - g.out) = 0 removes the E_w[k] term of the covariance (FlashAttention's
dS = P o (dP - rowsum(dO o O))). Centring on g.out keeps the terms small where one entry dominates, so float32
loses no more than it does in the forward. The backward recomputes the logits tile by tile from the queries and
the dictionary, with the forward's log-normaliser (`Reduction.log_normaliser`, bits): w_j = 2^(s_j - L), no
second max or sum; the query-entry matrix never exists beyond one tile, and the memory budget bounds the
dictionary chunk and the tiles as in the torch path. One torch implementation serves every exact backend that
ran the forward (they all give the same softmax); approximate ones (top-k) are refused.

Machines differentiate through patch extraction with torch's autograd: the adjoint of `extract_patches` (indexing
a padded image) scatters each query's gradient back to the pixels of its patch, dropping zero padding and adding
circular wraps.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .api import Reduction, softmax_reduce
from .dictionary import Dictionary
from .peaks import fixed_order_dot
from .registry import Backend, BackendSpec, get_backend
from .state import logit_scales
from .torch_backend import MIN_TILE, QUERY_TILE, TILE_BYTES

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["NotDifferentiable", "check_differentiable", "differentiable_reduce", "plan_backward", "query_vjp"]


class NotDifferentiable(RuntimeError):
    """The reduction was asked for a gradient that it cannot give: through an approximate backend, or a second
    derivative."""


def check_differentiable(backend: BackendSpec) -> None:
    """Raise `NotDifferentiable` unless `backend` computes the exact softmax (whose gradient `query_vjp` gives):
    "auto" and every exact backend do; top-k and any other approximate backend do not (whether or not it could
    run here)."""
    if isinstance(backend, str) and backend == "auto":
        return
    named = backend if isinstance(backend, Backend) else get_backend(backend)
    if not named.EXACT:
        raise NotDifferentiable(
            f"backend {named.NAME!r} approximates the softmax and cannot give exact gradients; the input requires "
            "grad: use an exact backend (backend='auto', 'torch', 'cpu', ...) or call under torch.no_grad()"
        )


def _state_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Where the gradient accumulates: float64 (MPS has none: there the query dtype)."""
    return dtype if device.type == "mps" else torch.float64


def plan_backward(queries: torch.Tensor, dictionary: Dictionary, memory_budget: int) -> tuple[int, int, int]:
    """Sizes for the backward within a memory budget in bytes: (training images per dictionary chunk, query tile,
    key tile). The budget covers two tiles (weights and their upstream products), the queries, the upstream
    gradient and output, the float64 gradient accumulator and one dictionary chunk; as in the torch path a chunk
    holds at least one image and the tiles at least `MIN_TILE` elements."""
    G, M, D = queries.shape
    E = dictionary.value_dim
    itemsize = queries.element_size()
    acc_itemsize = torch.empty(0, dtype=_state_dtype(queries.dtype, queries.device)).element_size()
    tile_elems = max(MIN_TILE, min(TILE_BYTES, memory_budget // 4) // itemsize) // 2
    query_tile = max(1, min(M, QUERY_TILE, tile_elems // G))
    key_tile = max(1, tile_elems // (G * query_tile))
    fixed = itemsize * (2 * tile_elems + G * M * (D + 2 * E + 2)) + acc_itemsize * G * M * D
    images = (memory_budget - fixed) // dictionary.bytes_per_image(itemsize)
    return max(1, min(dictionary.num_images, images)), query_tile, key_tile


def query_vjp(
    queries: torch.Tensor,
    dictionary: Dictionary,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    log_normaliser: torch.Tensor,
    *,
    abar: float,
    memory_budget: int,
) -> torch.Tensor:
    """The gradient `(G, M, D)` of `sum(grad_out * out)` with respect to `queries` `(G, M, D)`, where `out`
    `(G, M, E)` is the reduction of the queries over `dictionary` at `abar` and `log_normaliser` `(G, M)` its
    per-query log2 normaliser (both from `softmax_reduce`), `grad_out` `(G, M, E)`. Runs in the queries' dtype and
    device, accumulating across tiles in float64; streams the dictionary in chunks as the torch path does."""
    G, M, D = queries.shape
    dtype, device = queries.dtype, queries.device
    q_scale, key_scale = logit_scales(abar)
    q = queries * q_scale
    grad_out = grad_out.to(dtype)
    delta = (grad_out * out.to(dtype)).sum(dim=-1, keepdim=True)  # (G, M, 1): g.out
    lse = log_normaliser.to(dtype).unsqueeze(-1)  # (G, M, 1)
    grad = torch.zeros(G, M, D, dtype=_state_dtype(dtype, device), device=device)
    images_per_chunk, query_tile, key_tile = plan_backward(queries, dictionary, memory_budget)
    for start in range(0, dictionary.num_images, images_per_chunk):
        keys, values = dictionary.entries(start, start + images_per_chunk, dtype)
        keys, values = keys.to(device), values.to(device)
        bias = fixed_order_dot(keys, keys).mul_(-key_scale)  # (G, n), the forward's key-norm term
        keys_t, values_t = keys.transpose(1, 2), values.transpose(1, 2)  # (G, D, n), (G, E, n)
        for q0 in range(0, M, query_tile):
            q1 = q0 + query_tile
            q_tile, g_tile = q[:, q0:q1], grad_out[:, q0:q1]
            for k0 in range(0, keys.shape[1], key_tile):
                k1 = k0 + key_tile
                weights = torch.baddbmm(bias[:, None, k0:k1], q_tile, keys_t[:, :, k0:k1])  # logits, bits
                weights = torch.exp2(weights.sub_(lse[:, q0:q1]), out=weights)  # w_j = 2^(s_j - L)
                ds = torch.bmm(g_tile, values_t[:, :, k0:k1]).sub_(delta[:, q0:q1]).mul_(weights)
                grad[:, q0:q1] += torch.bmm(ds, keys[:, k0:k1])
    a, T = math.sqrt(abar), 2.0 * (1.0 - abar)
    return grad.mul_(2.0 * a / T).to(dtype)


class _QueryGradient(torch.autograd.Function):
    """Identity on the forward's values, whose backward is `query_vjp` (summed over the ranks of a sharded
    dictionary: each rank streams its own shard with the global normaliser)."""

    @staticmethod
    def forward(ctx, queries, values, log_normaliser, dictionary, abar, memory_budget, process_group):
        ctx.save_for_backward(queries, values, log_normaliser)
        ctx.problem = (dictionary, abar, memory_budget, process_group)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values):
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself would be differentiated
            raise NotDifferentiable(
                "second derivatives of a machine (backward with create_graph=True, torch.autograd.functional."
                "hessian) are not implemented; first derivatives (backward, grad, jacobian) are exact"
            )
        queries, values, log_normaliser = ctx.saved_tensors
        dictionary, abar, memory_budget, process_group = ctx.problem
        grad = query_vjp(
            queries, dictionary, grad_values, values, log_normaliser, abar=abar, memory_budget=memory_budget
        )
        if process_group is not None:
            torch.distributed.all_reduce(grad, group=process_group)
        return grad, None, None, None, None, None, None


def differentiable_reduce(
    queries: torch.Tensor,
    dictionary: Dictionary,
    *,
    abar: float,
    backend: BackendSpec = "auto",
    memory_budget: int,
    provenance: bool = False,
    process_group: ProcessGroup | None = None,
) -> Reduction:
    """`softmax_reduce` (same arguments; it calls this for queries that require grad) whose `values` carry the
    exact gradient with respect to `queries` (`query_vjp` in the backward; with a process group every rank must
    run the backward, a collective). Raises `NotDifferentiable` for an approximate backend, before any work."""
    check_differentiable(backend)
    result = softmax_reduce(
        queries.detach(),
        dictionary,
        abar=abar,
        backend=backend,
        memory_budget=memory_budget,
        provenance=provenance,
        process_group=process_group,
    )
    values = _QueryGradient.apply(
        queries, result.values, result.log_normaliser, dictionary, abar, memory_budget, process_group
    )
    return replace(result, values=values)
