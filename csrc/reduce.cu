// Fused gather + distance + online softmax for CUDA (Ampere/Hopper, fp32 FMAs). See reduce.h and csrc/README.md.
#include <cuda_runtime.h>

#include <cmath>
#include <vector>

#include "reduce.h"

namespace elsfast {
namespace {

__host__ __device__ inline float pixel(const ReduceArgs& a, int64_t index) {
  if (a.uint8) return static_cast<const uint8_t*>(a.images)[index] / 127.5f - 1.0f;
  return static_cast<const float*>(a.images)[index];
}

// Entry j of a group is image n = j % N at position s = j / N (entry-major, as the Triton kernel); its key
// feature d is pixel key_offsets[g, s, d] of image n (0 where the offset is -1), its value channel e pixel
// value_offsets[g, s, e], its local id n * S + s.

// Entry j0 + jj as (position s, image n), from the tile's first entry (s0, n0) = (j0 / N, j0 % N): the kernel
// divides once per tile instead of once per gathered feature (the cost it saves: docs/performance.md).
__host__ __device__ inline void tile_entry(const ReduceArgs& a, int64_t s0, int64_t n0, int jj, int64_t& s,
                                           int64_t& n) {
  s = s0;
  n = n0 + jj;
  while (n >= a.N) {  // at most once when N >= kTileN
    n -= a.N;
    ++s;
  }
}

// 2^k exactly, for integral k <= 0 (0 below 2^-1074 and for k = -inf): rescaling the fp64 sums by it is exact.
__host__ __device__ inline double pow2(float k) { return k < -1100.0f ? 0.0 : ldexp(1.0, static_cast<int>(k)); }

// The streaming log-sum-exp state of one query (elsfast/reduce/state.py), in bits. kE: value channels, a
// template parameter so that the accumulators and every loop over them live in registers (a runtime E put acc[]
// in local memory; docs/performance.md, "The CUDA kernel").
//
// A thread folds up to ~10^7 entries (all 60,000 MNIST digits at P = 3 in one split): fp32 running sums lost 10%
// of the normaliser there. So each tile's kTileN terms are summed in fp32 and folded into fp64 sums, taken against
// an integral reference r >= every logit seen (the largest ceil of a tile's maximum): the weights 2^(s - r) are at
// most 1, and the fp64 sums are rescaled only when r grows, by an exact power of two (`pow2`). The true maximum x
// is kept beside r, and `store` moves the sums to it (times 2^(r - x) in [1, 2), in fp64). Bound: docs/design.md.
template <int kE>
struct Online {
  float x = -INFINITY, r = -INFINITY;
  double l = 0.0, u = 0.0;
  double acc[kE];
  int64_t best = -1;

  __host__ __device__ Online() {
#pragma unroll
    for (int e = 0; e < kE; ++e) acc[e] = 0.0;
  }

  // Fold one tile: logits s[j] (-inf for the tile's unused slots), values v[j][e], local ids ids[j].
  __host__ __device__ void fold(const float (&s)[kTileN], const float (*v)[kMaxE], const int64_t* ids,
                                bool provenance) {
    float tile_max = -INFINITY;
    int arg = 0;
#pragma unroll
    for (int j = 0; j < kTileN; ++j) {
      if (s[j] > tile_max) {
        tile_max = s[j];
        arg = j;
      }
    }
    const float r_new = fmaxf(r, ceilf(tile_max));
    if (r_new > r) {  // rarely after the first tiles: a divergent branch, not a cost per tile
      const double alpha = pow2(r - r_new);  // 0 while no entry has been seen (r = -inf)
      if (provenance) u = alpha * (u + (l > 0.0 ? (static_cast<double>(r) - r_new) * l : 0.0));
      l *= alpha;
#pragma unroll
      for (int e = 0; e < kE; ++e) acc[e] *= alpha;
    }
    if (provenance) {
      // on equal maxima the lowest id, in the tile and against the running maximum (ReduceState.merge_): entries
      // are entry-major (j = s N + n, id n S + s), so the tile's first maximum need not have its lowest id; a
      // logit depends on its query and key alone (the features are summed in one fixed order for every entry), so
      // identical patches tie exactly wherever the split or the shard puts them
      if (tile_max >= x && tile_max > -INFINITY) {
        int64_t lowest = ids[arg];
#pragma unroll
        for (int j = 0; j < kTileN; ++j) {
          if (s[j] == tile_max && ids[j] < lowest) lowest = ids[j];
        }
        if (tile_max > x || lowest < best) best = lowest;
      }
    }
    float tile_l = 0.0f, tile_u = 0.0f, tile_acc[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e) tile_acc[e] = 0.0f;
#pragma unroll
    for (int j = 0; j < kTileN; ++j) {
      const float p = exp2f(s[j] - r_new);
      tile_l += p;
#pragma unroll
      for (int e = 0; e < kE; ++e) tile_acc[e] += p * v[j][e];
      if (provenance && p > 0.0f) tile_u += p * (s[j] - r_new);
    }
    l += tile_l;
#pragma unroll
    for (int e = 0; e < kE; ++e) acc[e] += tile_acc[e];
    if (provenance) u += tile_u;
    x = fmaxf(x, tile_max);
    r = r_new;
  }

  // The sums relative to the true maximum x, as ReduceState keeps them.
  __host__ __device__ void store(const ReduceArgs& a, int64_t out) const {
    const double gap = x > -INFINITY ? static_cast<double>(r) - x : 0.0;
    const double c = exp2(gap);
    a.m[out] = x;
    a.l[out] = l * c;
#pragma unroll
    for (int e = 0; e < kE; ++e) a.acc[out * kE + e] = acc[e] * c;
    if (a.provenance) {
      a.best[out] = best;
      a.u[out] = c * (u + gap * l);
    }
  }
};

__host__ __device__ inline int64_t split_stop(const ReduceArgs& a, int64_t split) {
  const int64_t stop = (split + 1) * a.entries_per_split;
  return stop < a.N * a.S ? stop : a.N * a.S;
}

// Grid (query blocks, G, splits); block kBlockQ threads, thread t owns query blockIdx.x * kBlockQ + t. The
// query's current chunk of kChunkD features lives in the thread's registers (qr), loaded once per block when
// D <= kChunkD; each entry's chunk is read from shared memory as a broadcast, 4 features a load.
// At least 3 blocks per SM: ptxas's own choice for E = 1 was 128 registers and a 24-byte spill; with the bound it
// takes 148-160 registers and spills nothing (benchmarks/static_cost.py).
// kProvenance: whether the dominant entry and the entropy moment are tracked, a template parameter so that the
// kernel without provenance carries none of its instructions (the static cost tool counts the main loop's).
template <int kE, bool kProvenance>
__global__ void __launch_bounds__(kBlockQ, 3) reduce_kernel(const ReduceArgs a) {
  __shared__ __align__(16) float keys[kTileN][kChunkD];
  __shared__ float queries[kChunkD][kBlockQ];
  __shared__ float norms[kTileN];
  __shared__ float values[kTileN][kMaxE];
  __shared__ int64_t ids[kTileN];

  const int t = threadIdx.x;
  const int64_t g = blockIdx.y, split = blockIdx.z;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kBlockQ;
  const int64_t row = first_row + t;
  const int64_t start = split * a.entries_per_split, stop = split_stop(a, split);
  const bool one_chunk = a.D <= kChunkD;
  float qr[kChunkD];
  // Stage the queries' chunk d0 through shared memory (coalesced global reads), then into registers.
  auto load_queries = [&](int64_t d0, int dc) {
    for (int i = t; i < kChunkD * kBlockQ; i += kBlockQ) {
      const int d = i / kBlockQ, r = i % kBlockQ;
      const int64_t qrow = first_row + r;
      queries[d][r] = (d < dc && qrow < a.M) ? a.q[(g * a.M + qrow) * a.D + d0 + d] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kChunkD; ++d) qr[d] = queries[d][t];
  };
  if (one_chunk) load_queries(0, static_cast<int>(a.D));
  Online<kE> state;
  for (int64_t j0 = start; j0 < stop; j0 += kTileN) {
    const int n = static_cast<int>(stop - j0 < kTileN ? stop - j0 : kTileN);
    __syncthreads();  // the previous tile's shared memory has been read
    const int64_t s0 = j0 / a.N, n0 = j0 - s0 * a.N;
    if (t < kTileN) {
      int64_t s_t, n_t;
      tile_entry(a, s0, n0, t, s_t, n_t);
      norms[t] = 0.0f;
      ids[t] = t < n ? n_t * a.S + s_t : -1;
      const int32_t* voff = a.value_offsets + (g * a.S + s_t) * a.E;
#pragma unroll
      for (int e = 0; e < kE; ++e) values[t][e] = t < n ? pixel(a, n_t * a.pixels_per_image + voff[e]) : 0.0f;
    }
    float dots[kTileN];
#pragma unroll
    for (int j = 0; j < kTileN; ++j) dots[j] = 0.0f;
    for (int64_t d0 = 0; d0 < a.D; d0 += kChunkD) {
      const int dc = static_cast<int>(a.D - d0 < kChunkD ? a.D - d0 : kChunkD);
      if (d0 > 0) __syncthreads();  // the previous chunk has been read
      for (int i = t; i < kTileN * kChunkD; i += kBlockQ) {
        const int j = i / kChunkD, d = i % kChunkD;
        float k = 0.0f;
        if (j < n && d < dc) {
          int64_t s_j, n_j;
          tile_entry(a, s0, n0, j, s_j, n_j);
          const int32_t off = a.key_offsets[(g * a.S + s_j) * a.D + d0 + d];
          k = off < 0 ? 0.0f : pixel(a, n_j * a.pixels_per_image + off);
        }
        keys[j][d] = k;
      }
      if (!one_chunk) load_queries(d0, dc);  // includes the barrier after the key tile's stores
      else __syncthreads();
      if (t < kTileN) {
        float sum = 0.0f;
        for (int d = 0; d < dc; ++d) sum += keys[t][d] * keys[t][d];
        norms[t] += sum;
      }
#pragma unroll
      for (int j = 0; j < kTileN; ++j) {
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < kChunkD; ++d) dot += qr[d] * keys[j][d];
        dots[j] += dot;
      }
    }
    __syncthreads();  // norms, values and ids are complete
    float s[kTileN];
#pragma unroll
    for (int j = 0; j < kTileN; ++j) s[j] = j < n ? dots[j] - a.key_scale * norms[j] : -INFINITY;
    state.fold(s, values, ids, kProvenance);
  }
  if (row < a.M) state.store(a, (split * a.G + g) * a.M + row);
}

template <int kE>
void reduce_host_impl(const ReduceArgs& a) {
  std::vector<float> keys(kTileN * a.D);
  float values[kTileN][kMaxE];
  int64_t ids[kTileN];
  for (int64_t split = 0; split < a.splits; ++split) {
    for (int64_t g = 0; g < a.G; ++g) {
      std::vector<Online<kE>> states(a.M);
      const int64_t stop = split_stop(a, split);
      for (int64_t j0 = split * a.entries_per_split; j0 < stop; j0 += kTileN) {
        const int n = static_cast<int>(stop - j0 < kTileN ? stop - j0 : kTileN);
        float norms[kTileN] = {};
        const int64_t s0 = j0 / a.N, n0 = j0 - s0 * a.N;  // the kernel's per-tile entry decoding
        for (int j = 0; j < kTileN; ++j) {
          int64_t s_j, n_j;
          tile_entry(a, s0, n0, j, s_j, n_j);
          ids[j] = j < n ? n_j * a.S + s_j : -1;
          const int32_t* voff = a.value_offsets + (g * a.S + s_j) * a.E;
          for (int e = 0; e < kE; ++e) values[j][e] = j < n ? pixel(a, n_j * a.pixels_per_image + voff[e]) : 0.0f;
          for (int64_t d = 0; d < a.D; ++d) {
            const int32_t off = j < n ? a.key_offsets[(g * a.S + s_j) * a.D + d] : -1;
            keys[j * a.D + d] = off < 0 ? 0.0f : pixel(a, n_j * a.pixels_per_image + off);
            norms[j] += keys[j * a.D + d] * keys[j * a.D + d];
          }
        }
        for (int64_t row = 0; row < a.M; ++row) {
          const float* q = a.q + (g * a.M + row) * a.D;
          float s[kTileN];
          for (int j = 0; j < kTileN; ++j) {
            float dot = 0.0f;
            for (int64_t d = 0; d < a.D; ++d) dot += q[d] * keys[j * a.D + d];
            s[j] = j < n ? dot - a.key_scale * norms[j] : -INFINITY;
          }
          states[row].fold(s, values, ids, a.provenance);
        }
      }
      for (int64_t row = 0; row < a.M; ++row) states[row].store(a, (split * a.G + g) * a.M + row);
    }
  }
}

template <int kE>
void launch_instance(const ReduceArgs& a, dim3 grid, cudaStream_t s) {
  if (a.provenance) {
    reduce_kernel<kE, true><<<grid, kBlockQ, 0, s>>>(a);
  } else {
    reduce_kernel<kE, false><<<grid, kBlockQ, 0, s>>>(a);
  }
}

}  // namespace

const char* launch_reduce(const ReduceArgs& args, std::uintptr_t stream, int device) {
  if (args.E > kMaxE) return "elsfast._cuda: more than 4 value channels";
  // Launch on the tensors' device, not the runtime's current one (the stream belongs to the tensors' device),
  // and leave the caller's current device as it was.
  int previous = 0;
  cudaError_t error = cudaGetDevice(&previous);
  if (error == cudaSuccess && previous != device) error = cudaSetDevice(device);
  if (error != cudaSuccess) return cudaGetErrorString(error);
  const dim3 grid(static_cast<unsigned>((args.M + kBlockQ - 1) / kBlockQ), static_cast<unsigned>(args.G),
                  static_cast<unsigned>(args.splits));
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.E) {  // one instance per value channel count (E = C of the patch dictionaries) and provenance
    case 1: launch_instance<1>(args, grid, s); break;
    case 2: launch_instance<2>(args, grid, s); break;
    case 3: launch_instance<3>(args, grid, s); break;
    default: launch_instance<4>(args, grid, s); break;
  }
  error = cudaGetLastError();
  if (previous != device) cudaSetDevice(previous);
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

void reduce_host(const ReduceArgs& a) {
  switch (a.E) {
    case 1: reduce_host_impl<1>(a); break;
    case 2: reduce_host_impl<2>(a); break;
    case 3: reduce_host_impl<3>(a); break;
    default: reduce_host_impl<4>(a); break;
  }
}

}  // namespace elsfast
