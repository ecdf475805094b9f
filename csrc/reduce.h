// elsfast._cuda: the fused patch-softmax reduction for CUDA (SPEC section 5), sibling of the Triton kernel in
// kernels/softmax_reduce.py. See csrc/README.md for what it computes, its tiling and its limits.
#pragma once

#include <cstdint>

namespace elsfast {

constexpr int kBlockQ = 128;  // queries per block, one per thread
constexpr int kTileN = 32;    // dictionary entries per shared-memory tile
constexpr int kChunkD = 32;   // key features per shared-memory chunk
constexpr int kMaxE = 4;      // value channels (patch dictionaries: the centre pixel's C channels)

// One reduction. Pointers are device pointers for launch_reduce and host pointers for reduce_host.
struct ReduceArgs {
  const float* q;                // (G, M, D) queries scaled to bits: q 2a/T log2(e)
  const void* images;            // (N, pixels_per_image) uint8 (mapped to [-1, 1]) or float32
  const int32_t* key_offsets;    // (G, S, D) pixel offsets into an image, -1 = zero padding
  const int32_t* value_offsets;  // (G, S, E)
  float* m;                      // (splits, G, M) out: the largest logit, bits
  double* l;                     // (splits, G, M) out: sum of 2^(s - m)
  double* acc;                   // (splits, G, M, E) out: sum of 2^(s - m) v
  int64_t* best;                 // (splits, G, M) out: local id n * S + s of the largest logit (provenance)
  double* u;                     // (splits, G, M) out: sum of 2^(s - m) (s - m) (provenance)
  int64_t G, M, N, S, D, E, pixels_per_image, entries_per_split, splits;
  float key_scale;  // a^2/T log2(e): logit s = q.k - key_scale |k|^2
  bool uint8;
  bool provenance;
};

// Launch on `stream` (a cudaStream_t as an integer) of CUDA device `device`, the device of the tensors (the current
// device is restored afterwards). Returns nullptr or the CUDA error's message.
const char* launch_reduce(const ReduceArgs& args, std::uintptr_t stream, int device);

// The kernel's per-query algorithm (same entry order, tiles, helpers and online update) run serially on the
// host: tests check the CUDA source's arithmetic and indexing with it on machines without a GPU.
void reduce_host(const ReduceArgs& args);

}  // namespace elsfast
