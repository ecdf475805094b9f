// Fused gather + distance + online softmax for x86-64 CPUs (AVX2 + FMA or AVX-512, OpenMP). See cpu_reduce.h and
// csrc/README.md.
//
// Per group and per chunk of `tiles_per_chunk` key tiles, the threads first pack the chunk's keys from the
// training images (pixel offset tables; uint8 mapped to [-1, 1]) into panels of two vectors' width x D features,
// with the bias -key_scale |k|^2, the values and the entry ids; then each work unit (a block of 96 queries and one
// split) runs a 6-query x 2-vector register-tiled micro-kernel over its tiles (t % splits == split) and folds
// every query's row of logits into its streaming log-sum-exp state with a vectorised exp2. fp32 logits, fp64 sums.
//
// The kernel body (cpu_kernel.inc) is compiled once per ISA, inside its own namespace under `#pragma GCC target`,
// so the module loads on any x86-64 CPU and runs the widest ISA the CPU has (`supported`). Only C functions and
// code with internal linkage are used under the target pragmas, so that no AVX copy of an inline library
// function can be picked by the linker for code that runs elsewhere.
#include "cpu_reduce.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define ELSFAST_CPU_X86 1
#else
#define ELSFAST_CPU_X86 0
#endif

namespace elsfast {
namespace cpu {

#if ELSFAST_CPU_X86

bool supported(int isa) {
  if (isa == kIsaAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == kIsaAvx512) return __builtin_cpu_supports("avx512f");
  return false;
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
namespace {

using V = __m256;
constexpr int kLanes = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vset1(float x) { return _mm256_set1_ps(x); }
inline V vload(const float* p) { return _mm256_load_ps(p); }
inline void vstore(float* p, V v) { _mm256_store_ps(p, v); }
inline V vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline V vadd(V a, V b) { return _mm256_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }  // returns b where a is NaN
inline V vfmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }

inline float vhsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float vhmax(V v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline bool vany_gt(V a, V b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
inline unsigned veq_mask(V a, V b) {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)));
}

inline V vround(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// 2^n for integral n in [-127, 0] through the exponent bits; n = -127 gives the bit pattern 0, i.e. 0.0f
inline V vpow2i(V n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

#include "cpu_kernel.inc"
#include "cpu_shift_kernel.inc"

}  // namespace
void reduce(const Args& a) { run(a); }
void reduce_shifts(const ShiftArgs& a) { run_shifts(a); }
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps() and warn that it is uninitialised (GCC bug 105593)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
namespace {

using V = __m512;
constexpr int kLanes = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset1(float x) { return _mm512_set1_ps(x); }
inline V vload(const float* p) { return _mm512_load_ps(p); }
inline void vstore(float* p, V v) { _mm512_store_ps(p, v); }
inline V vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }  // returns b where a is NaN
inline V vfmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
// Horizontal sum and max by folding halves with AVX-512F shuffles (GCC 12's _mm512_reduce_* intrinsics warn).
inline float vhsum(V v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_cvtss_f32(_mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1))));
}

inline float vhmax(V v) {
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_max_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_max_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm512_cvtss_f32(_mm512_max_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1))));
}

inline bool vany_gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
inline unsigned veq_mask(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }

inline V vround(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

inline V vpow2i(V n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}

#include "cpu_kernel.inc"
#include "cpu_shift_kernel.inc"

}  // namespace
void reduce(const Args& a) { run(a); }
void reduce_shifts(const ShiftArgs& a) { run_shifts(a); }
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

void reduce(const Args& a) {
  if (a.isa == kIsaAvx512) {
    avx512::reduce(a);
  } else {
    avx2::reduce(a);
  }
}

void reduce_shifts(const ShiftArgs& a) {
  if (a.isa == kIsaAvx512) {
    avx512::reduce_shifts(a);
  } else {
    avx2::reduce_shifts(a);
  }
}

int lanes(int isa) { return isa == kIsaAvx512 ? 16 : 8; }

#else  // not x86-64 with GCC/Clang: the module builds and reports that it cannot run

bool supported(int) { return false; }

void reduce(const Args&) { abort(); }

void reduce_shifts(const ShiftArgs&) { abort(); }

int lanes(int isa) { return isa == kIsaAvx512 ? 16 : 8; }

#endif

}  // namespace cpu
}  // namespace elsfast
