// elsfast._cpu: the fused patch-softmax reduction for x86-64 CPUs with AVX2 + FMA or AVX-512 (SPEC section 5),
// sibling of the CUDA kernel in reduce.cu. See csrc/README.md for what it computes, its tiling and its limits.
#pragma once

#include <cstdint>

#include "reduce_args.h"

namespace elsfast {
namespace cpu {

constexpr int kTileN = 256;  // dictionary entries per packed key tile (panels of two vectors' width)
constexpr int kStripe = 6;   // queries per micro-kernel call (6 x 2 vectors of logits in 12 registers)
constexpr int kBlockQ = 96;  // queries per work unit (16 stripes)
constexpr int kMaxE = 4;     // value channels (patch dictionaries: the centre pixel's C channels)
constexpr int kIsaAvx2 = 0;    // 8-lane AVX2 + FMA
constexpr int kIsaAvx512 = 1;  // 16-lane AVX-512F

// One reduction over host memory. Entry j of a group is image n = j % N at position s = j / N (entry-major, as in
// the torch, Triton and CUDA backends), so that ties between equal logits resolve to the same entry everywhere.
// Tile t of a chunk folds into split t % splits. Running sums are fp64 inside and stored as fp32.
struct Args : ReductionTensors<float> {
  const float* image_bias;  // (N,) or null: bits added to every logit of image n (log2 of a multiplicity)
  int64_t tiles_per_chunk;  // key tiles packed at once and shared by all threads
  int threads;
  int isa;  // kIsaAvx2 or kIsaAvx512; the results agree to fp32 rounding
};

// The displacement kernel (zero-padded ELS, csrc/cpu_shift_kernel.inc): queries are the patches of B whole images
// at every position of each group, a group is a rectangle of rows x cols positions, and a pair's dot product is a
// box sum along its displacement. Lanes are training images; no provenance.
struct ShiftArgs {
  const float* x;        // (B, C, H + 2r, W + 2r) query images, zero-padded by r = P / 2
  const void* images;    // (N, C, H, W) uint8 (mapped to [-1, 1]) or float32
  const int32_t* groups;  // (G, 4) first row, rows, first column, columns of each group's positions
  float* m;              // (splits, G, M) out: running max, bits; query (s, b) of a group at s * B + b, s row-major
  float* l;              // (splits, G, M) out: sum of 2^(s - m)
  float* acc;            // (splits, G, M, C) out: sum of 2^(s - m) v
  int64_t B, C, H, W, N, G, M, P;
  int64_t splits;   // partial states per query: block k of kLanes images folds into split k % splits
  float q_scale;    // 2a/T log2(e): logit s = q_scale q.k - key_scale |k|^2
  float key_scale;  // a^2/T log2(e)
  bool uint8;
  int threads;
  int isa;
};

// True when this CPU runs the code of `isa` (checked at run time; the module itself is built for any x86-64).
bool supported(int isa);

// Fold every group's dictionary into `splits` partial states per query. Call only when supported(args.isa).
void reduce(const Args& args);

// Fold every group's dictionary into `splits` partial states per query with the displacement kernel.
void reduce_shifts(const ShiftArgs& args);

// Training images per vector lane of `isa` (the displacement kernel's image block).
int lanes(int isa);

}  // namespace cpu
}  // namespace elsfast
