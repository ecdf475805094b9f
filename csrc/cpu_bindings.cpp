// pybind11 module elsfast._cpu: raw pointers (tensor.data_ptr()) as integers, like elsfast._cuda, so the module
// needs no torch headers and no torch ABI. Shapes are checked in elsfast/reduce/cpu_backend.py, which owns the
// tensors. This file is compiled for any x86-64 CPU; the kernels of cpu_reduce.cpp run only where supported().
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_reduce.h"

namespace py = pybind11;
namespace cpu = elsfast::cpu;

namespace {

// The code of instruction set `isa`, raising unless it is a known name that this CPU runs.
int runnable_isa(const std::string& isa) {
  const int code = isa == "avx512" ? cpu::kIsaAvx512 : isa == "avx2" ? cpu::kIsaAvx2 : -1;
  if (code < 0) throw std::invalid_argument("elsfast._cpu: isa must be 'avx2' or 'avx512'");
  if (!cpu::supported(code)) throw std::runtime_error("elsfast._cpu: this CPU does not run " + isa);
  return code;
}

}  // namespace

PYBIND11_MODULE(_cpu, module) {
  module.doc() = "elsfast's fused CPU reduction (csrc/cpu_reduce.cpp). Pointers are integers; see "
                 "elsfast/reduce/cpu_backend.py.";
  module.attr("TILE_N") = cpu::kTileN;
  module.attr("BLOCK_Q") = cpu::kBlockQ;
  module.attr("MAX_E") = cpu::kMaxE;
  module.def(
      "isas",
      [] {
        py::list names;
        if (cpu::supported(cpu::kIsaAvx2)) names.append("avx2");
        if (cpu::supported(cpu::kIsaAvx512)) names.append("avx512");
        return names;
      },
      "The instruction sets this CPU runs the kernel with (AVX2 + FMA, AVX-512F), narrowest first.");
  module.def(
      "reduce",
      [](std::uintptr_t q, std::uintptr_t images, std::uintptr_t key_offsets, std::uintptr_t value_offsets,
         std::uintptr_t m, std::uintptr_t l, std::uintptr_t acc, std::uintptr_t best, std::uintptr_t u, int64_t G,
         int64_t M, int64_t N, int64_t S, int64_t D, int64_t E, int64_t pixels_per_image, int64_t splits,
         int64_t tiles_per_chunk, float key_scale, bool uint8, bool provenance, int threads, const std::string& isa,
         std::uintptr_t image_bias) {
        const int code = runnable_isa(isa);
        if (E < 1 || E > cpu::kMaxE) throw std::invalid_argument("elsfast._cpu: value channels must be 1..4");
        if (G < 1 || M < 1 || N < 1 || S < 1 || D < 1 || splits < 1 || tiles_per_chunk < 1 || threads < 1)
          throw std::invalid_argument("elsfast._cpu: sizes must be positive");
        const cpu::Args args{reinterpret_cast<const float*>(q),
                             reinterpret_cast<const void*>(images),
                             reinterpret_cast<const int32_t*>(key_offsets),
                             reinterpret_cast<const int32_t*>(value_offsets),
                             reinterpret_cast<float*>(m),
                             reinterpret_cast<float*>(l),
                             reinterpret_cast<float*>(acc),
                             reinterpret_cast<int64_t*>(best),
                             reinterpret_cast<float*>(u),
                             reinterpret_cast<const float*>(image_bias),
                             G, M, N, S, D, E, pixels_per_image, splits, tiles_per_chunk, key_scale, uint8,
                             provenance, threads, code};
        py::gil_scoped_release release;
        cpu::reduce(args);
      },
      "Fold every group's dictionary into `splits` partial states per query (see csrc/cpu_reduce.h); "
      "`image_bias` 0 or the pointer of N fp32 bits added to the logits of each image's entries.");
  module.def(
      "lanes", [](const std::string& isa) { return cpu::lanes(isa == "avx512" ? cpu::kIsaAvx512 : cpu::kIsaAvx2); },
      "Training images a vector lane block of the displacement kernel holds under `isa`.");
  module.def(
      "reduce_shifts",
      [](std::uintptr_t x, std::uintptr_t images, std::uintptr_t groups, std::uintptr_t m, std::uintptr_t l,
         std::uintptr_t acc, int64_t B, int64_t C, int64_t H, int64_t W, int64_t N, int64_t G, int64_t M, int64_t P,
         int64_t splits, float q_scale, float key_scale, bool uint8, int threads, const std::string& isa) {
        const int code = runnable_isa(isa);
        if (C < 1 || C > cpu::kMaxE) throw std::invalid_argument("elsfast._cpu: channels must be 1..4");
        if (B < 1 || H < 1 || W < 1 || N < 1 || G < 1 || M < 1 || splits < 1 || threads < 1 || P < 1 || P % 2 == 0)
          throw std::invalid_argument("elsfast._cpu: sizes must be positive and the patch size odd");
        const cpu::ShiftArgs args{reinterpret_cast<const float*>(x),
                                  reinterpret_cast<const void*>(images),
                                  reinterpret_cast<const int32_t*>(groups),
                                  reinterpret_cast<float*>(m),
                                  reinterpret_cast<float*>(l),
                                  reinterpret_cast<float*>(acc),
                                  B, C, H, W, N, G, M, P, splits, q_scale, key_scale, uint8, threads, code};
        py::gil_scoped_release release;
        cpu::reduce_shifts(args);
      },
      "Fold every group's dictionary into `splits` partial states per query with the displacement kernel (see "
      "csrc/cpu_reduce.h: ShiftArgs).");
}
