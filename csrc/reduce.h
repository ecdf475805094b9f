// elsfast._cuda: the fused patch-softmax reduction for CUDA (SPEC section 5), sibling of the Triton kernel in
// kernels/softmax_reduce.py. See csrc/README.md for what it computes, its tiling and its limits.
#pragma once

#include <cstdint>

#include "reduce_args.h"

namespace elsfast {

constexpr int kBlockQ = 128;  // queries per block, one per thread
constexpr int kTileN = 32;    // dictionary entries per shared-memory tile
constexpr int kChunkD = 32;   // key features per shared-memory chunk
constexpr int kMaxE = 4;      // value channels (patch dictionaries: the centre pixel's C channels)

// One reduction; split k holds entries [k entries_per_split, (k + 1) entries_per_split) of each group. Pointers are
// device pointers for launch_reduce and host pointers for reduce_host.
struct ReduceArgs : ReductionTensors<double> {
  int64_t entries_per_split;
};

// Launch on `stream` (a cudaStream_t as an integer) of CUDA device `device`, the device of the tensors (the current
// device is restored afterwards). Returns nullptr or the CUDA error's message.
const char* launch_reduce(const ReduceArgs& args, std::uintptr_t stream, int device);

// The kernel's per-query algorithm (same entry order, tiles, helpers and online update) run serially on the
// host: tests check the CUDA source's arithmetic and indexing with it on machines without a GPU.
void reduce_host(const ReduceArgs& args);

}  // namespace elsfast
