"""Worst-case error bounds of the compiled float32 kernels (CPU, CUDA, Triton): what their arithmetic guarantees,
derived in docs/design.md ("Error bounds of the fused kernels") and declared by the backends as `Tolerance`s.

Notation: u = 2^-24 (fp32 unit roundoff), eps = 2u, D the key dimension, L the logit range of the problem (nats,
`Tolerance`), values in [-1, 1]. A backend's output is off the exact posterior mean by at most

    (e^(2 Delta) - 1) / 2   (~ Delta)        for logits off by at most Delta nats each, plus
    the rounding of the sums: a tile's k terms summed in fp32 (relative error <= k u for l, k u of sum p |v| for acc),
    then fp64 (negligible), then the fp32 cast and the division (3 u).

The logit error of a dot product of D fp32 products, scaled and subtracted from the key-norm term, is at most
(D + 6) u L: (D/2 + 3) eps L (`fma_logit_error`). Tensor cores accumulate with truncation (eps, not u, per
addition), and "fp16x2" adds the queries' two-halves split and a second pass (`TRITON_LOGIT_ERROR`).
"""

from __future__ import annotations

from .registry import Tolerance

__all__ = ["TRITON_LOGIT_ERROR", "U32", "fma_logit_error", "kernel_tolerance"]

U32 = 2.0**-24  # fp32 unit roundoff (half of torch.finfo(torch.float32).eps)

# A logit's worst-case error per precision of the distance dot, as (per_feature, per_logit) in eps32 * L:
# - "ieee" (fp32 FMAs): D products and sums, the query scale, the key norm term, the subtraction: (D + 6) u L;
# - "fp16x2": two tensor-core passes (2D truncated additions: 4D u), the split remainder (4u), the key norms (D u)
#   and the scalings (4u): (5D + 8) u L;
# - "tf32x3": three truncated passes (6D u), the dropped lo x lo product (2^-20 relative), scalings: (6D + 12) u L;
# - "tf32": truncated operands (2^-9 of sum |q'k|) on top of one pass: 2^14 eps L + (2D + 6) u L.
TRITON_LOGIT_ERROR = {
    "ieee": (0.5, 3.0),
    "fp16x2": (2.5, 4.0),
    "tf32x3": (3.0, 6.0),
    "tf32": (1.0, 3.0 + 2.0**14),
}


def fma_logit_error() -> tuple[float, float]:
    """(per_feature, per_logit) of an fp32 FMA dot's logit error, in eps32 * L: (D + 6) u L = (D/2 + 3) eps L."""
    return TRITON_LOGIT_ERROR["ieee"]


def kernel_tolerance(logit_error: tuple[float, float], tile_terms: int, exp2_relative: float) -> Tolerance:
    """The float32 `Tolerance` of a kernel whose logits are off by at most `logit_error` = (per_feature, per_logit)
    eps32 L, whose tile sums add at most `tile_terms` fp32 terms along any path before they are folded into fp64,
    and whose exponential is off by at most `exp2_relative` (a weight's relative error: a logit error of as much).

    The exponential's error and the rounding of r - s (2u L, in per_logit already) act as logit errors; the sums
    add (2 tile_terms + 6) u, and the fp64 folds and merges less than 1e-9 for up to 10^7 tiles."""
    per_feature, per_logit = logit_error
    absolute = exp2_relative + (2 * tile_terms + 6) * U32 + 1e-9
    return Tolerance(per_logit, absolute, per_feature)
