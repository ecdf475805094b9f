// The arguments both fused reductions share (elsfast._cpu's cpu::Args, elsfast._cuda's ReduceArgs): the inputs of
// partials.kernel_inputs and the per-split partial states. `Sum` is the type of the running-sum outputs: double
// for the CUDA kernel, float for the CPU kernel (it keeps fp64 sums and narrows them when it stores a state).
// Built only by reduce_binding.h, from tensors whose dtype, device, contiguity and shape it has checked.
#pragma once

#include <cstdint>

namespace elsfast {

template <typename Sum>
struct ReductionTensors {
  const float* q;                // (G, M, D) queries scaled to bits: q 2a/T log2(e)
  const void* images;            // (N, pixels_per_image) uint8 (mapped to [-1, 1]) or float32
  const int32_t* key_offsets;    // (G, S, D) pixel offsets into an image, -1 = zero padding
  const int32_t* value_offsets;  // (G, S, E)
  float* m;                      // (splits, G, M) out: running max, bits
  Sum* l;                        // (splits, G, M) out: sum of 2^(s - m)
  Sum* acc;                      // (splits, G, M, E) out: sum of 2^(s - m) v
  int64_t* best;                 // (splits, G, M) out: local id n * S + s of the largest logit (provenance)
  Sum* u;                        // (splits, G, M) out: sum of 2^(s - m) (s - m) (provenance)
  int64_t G, M, N, S, D, E, pixels_per_image, splits;
  float key_scale;  // a^2/T log2(e): logit s = q.k - key_scale |k|^2
  bool uint8;
  bool provenance;
};

}  // namespace elsfast
