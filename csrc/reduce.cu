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

// Entry j of a group is image n = j % N at position s = j / N (entry-major, as the Triton kernel).
__host__ __device__ inline int64_t local_id(const ReduceArgs& a, int64_t j) { return (j % a.N) * a.S + j / a.N; }

__host__ __device__ inline float key_feature(const ReduceArgs& a, int64_t g, int64_t j, int64_t d) {
  const int32_t off = a.key_offsets[(g * a.S + j / a.N) * a.D + d];
  return off < 0 ? 0.0f : pixel(a, (j % a.N) * a.pixels_per_image + off);
}

__host__ __device__ inline float value(const ReduceArgs& a, int64_t g, int64_t j, int64_t e) {
  return pixel(a, (j % a.N) * a.pixels_per_image + a.value_offsets[(g * a.S + j / a.N) * a.E + e]);
}

// The streaming log-sum-exp state of one query (elsfast/reduce/state.py), in bits.
struct Online {
  float m = -INFINITY, l = 0.0f, u = 0.0f;
  float acc[kMaxE] = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t best = -1;

  // Fold one tile: logits s[j] (-inf for the tile's unused slots), values v[j][e], local ids ids[j].
  __host__ __device__ void fold(const float (&s)[kTileN], const float (*v)[kMaxE], const int64_t* ids, int E,
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
    const float m_new = fmaxf(m, tile_max);
    const float alpha = exp2f(m - m_new);  // 0 while no entry has been seen (m = -inf)
    if (provenance) {
      u = alpha * (u + (l > 0.0f ? (m - m_new) * l : 0.0f));
      if (tile_max > m) best = ids[arg];
    }
    l *= alpha;
    for (int e = 0; e < E; ++e) acc[e] *= alpha;
#pragma unroll
    for (int j = 0; j < kTileN; ++j) {
      const float p = exp2f(s[j] - m_new);
      l += p;
      for (int e = 0; e < E; ++e) acc[e] += p * v[j][e];
      if (provenance && p > 0.0f) u += p * (s[j] - m_new);
    }
    m = m_new;
  }

  __host__ __device__ void store(const ReduceArgs& a, int64_t out) const {
    a.m[out] = m;
    a.l[out] = l;
    for (int e = 0; e < a.E; ++e) a.acc[out * a.E + e] = acc[e];
    if (a.provenance) {
      a.best[out] = best;
      a.u[out] = u;
    }
  }
};

__host__ __device__ inline int64_t split_stop(const ReduceArgs& a, int64_t split) {
  const int64_t stop = (split + 1) * a.entries_per_split;
  return stop < a.N * a.S ? stop : a.N * a.S;
}

// Grid (query blocks, G, splits); block kBlockQ threads, thread t owns query blockIdx.x * kBlockQ + t.
__global__ void __launch_bounds__(kBlockQ) reduce_kernel(const ReduceArgs a) {
  __shared__ float keys[kTileN][kChunkD];
  __shared__ float queries[kChunkD][kBlockQ];
  __shared__ float norms[kTileN];
  __shared__ float values[kTileN][kMaxE];
  __shared__ int64_t ids[kTileN];

  const int t = threadIdx.x;
  const int64_t g = blockIdx.y, split = blockIdx.z;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kBlockQ;
  const int64_t row = first_row + t;
  const int64_t start = split * a.entries_per_split, stop = split_stop(a, split);
  Online state;
  for (int64_t j0 = start; j0 < stop; j0 += kTileN) {
    const int n = static_cast<int>(stop - j0 < kTileN ? stop - j0 : kTileN);
    __syncthreads();  // the previous tile's shared memory has been read
    if (t < kTileN) {
      norms[t] = 0.0f;
      ids[t] = t < n ? local_id(a, j0 + t) : -1;
      for (int e = 0; e < a.E; ++e) values[t][e] = t < n ? value(a, g, j0 + t, e) : 0.0f;
    }
    float dots[kTileN];
#pragma unroll
    for (int j = 0; j < kTileN; ++j) dots[j] = 0.0f;
    for (int64_t d0 = 0; d0 < a.D; d0 += kChunkD) {
      const int dc = static_cast<int>(a.D - d0 < kChunkD ? a.D - d0 : kChunkD);
      if (d0 > 0) __syncthreads();  // the previous chunk has been read
      for (int i = t; i < kTileN * kChunkD; i += kBlockQ) {
        const int j = i / kChunkD, d = i % kChunkD;
        keys[j][d] = (j < n && d < dc) ? key_feature(a, g, j0 + j, d0 + d) : 0.0f;
      }
      for (int i = t; i < kChunkD * kBlockQ; i += kBlockQ) {
        const int d = i / kBlockQ, r = i % kBlockQ;
        const int64_t qrow = first_row + r;
        queries[d][r] = (d < dc && qrow < a.M) ? a.q[(g * a.M + qrow) * a.D + d0 + d] : 0.0f;
      }
      __syncthreads();
      if (t < kTileN) {
        float sum = 0.0f;
        for (int d = 0; d < dc; ++d) sum += keys[t][d] * keys[t][d];
        norms[t] += sum;
      }
#pragma unroll
      for (int j = 0; j < kTileN; ++j) {
        float dot = 0.0f;
#pragma unroll 8
        for (int d = 0; d < kChunkD; ++d) dot += queries[d][t] * keys[j][d];
        dots[j] += dot;
      }
    }
    __syncthreads();  // norms, values and ids are complete
    float s[kTileN];
#pragma unroll
    for (int j = 0; j < kTileN; ++j) s[j] = j < n ? dots[j] - a.key_scale * norms[j] : -INFINITY;
    state.fold(s, values, ids, static_cast<int>(a.E), a.provenance);
  }
  if (row < a.M) state.store(a, (split * a.G + g) * a.M + row);
}

}  // namespace

const char* launch_reduce(const ReduceArgs& args, std::uintptr_t stream) {
  if (args.E > kMaxE) return "elsfast._cuda: more than 4 value channels";
  const dim3 grid(static_cast<unsigned>((args.M + kBlockQ - 1) / kBlockQ), static_cast<unsigned>(args.G),
                  static_cast<unsigned>(args.splits));
  reduce_kernel<<<grid, kBlockQ, 0, reinterpret_cast<cudaStream_t>(stream)>>>(args);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

void reduce_host(const ReduceArgs& a) {
  std::vector<float> keys(kTileN * a.D);
  float values[kTileN][kMaxE];
  int64_t ids[kTileN];
  for (int64_t split = 0; split < a.splits; ++split) {
    for (int64_t g = 0; g < a.G; ++g) {
      std::vector<Online> states(a.M);
      const int64_t stop = split_stop(a, split);
      for (int64_t j0 = split * a.entries_per_split; j0 < stop; j0 += kTileN) {
        const int n = static_cast<int>(stop - j0 < kTileN ? stop - j0 : kTileN);
        float norms[kTileN] = {};
        for (int j = 0; j < kTileN; ++j) {
          ids[j] = j < n ? local_id(a, j0 + j) : -1;
          for (int e = 0; e < a.E; ++e) values[j][e] = j < n ? value(a, g, j0 + j, e) : 0.0f;
          for (int64_t d = 0; d < a.D; ++d) {
            keys[j * a.D + d] = j < n ? key_feature(a, g, j0 + j, d) : 0.0f;
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
          states[row].fold(s, values, ids, static_cast<int>(a.E), a.provenance);
        }
      }
      for (int64_t row = 0; row < a.M; ++row) states[row].store(a, (split * a.G + g) * a.M + row);
    }
  }
}

}  // namespace elsfast
