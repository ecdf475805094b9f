// pybind11 module elsfast._cpu: tensors in, checked and read through torch's Python API (reduce_binding.h, shared
// with elsfast._cuda), so the module needs no torch headers and no torch ABI. The typed calls, their planning and
// the custom ops around them are elsfast/reduce/cpu_ext.py. This file is compiled for any x86-64 CPU; the kernels
// of cpu_reduce.cpp run only where supported().
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu_reduce.h"
#include "reduce_binding.h"

namespace py = pybind11;
namespace cpu = elsfast::cpu;

namespace {

// The code of instruction set `isa`, raising unless it is a known name that this CPU runs.
int runnable_isa(const std::string& isa) {
  const int code = isa == "avx512" ? cpu::kIsaAvx512 : isa == "avx2" ? cpu::kIsaAvx2 : -1;
  if (code < 0) throw py::value_error("elsfast._cpu: isa must be 'avx2' or 'avx512', got '" + isa + "'");
  if (!cpu::supported(code)) throw std::runtime_error("elsfast._cpu: this CPU does not run " + isa);
  return code;
}

void check_positive(const char* name, int64_t value) {
  if (value < 1) throw py::value_error(std::string("elsfast._cpu: ") + name + " must be positive");
}

}  // namespace

PYBIND11_MODULE(_cpu, module) {
  module.doc() = "elsfast's fused CPU reduction (csrc/cpu_reduce.cpp). Tensors in; see elsfast/reduce/cpu_ext.py.";
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
      [](py::handle q, py::handle images, py::handle key_offsets, py::handle value_offsets, py::handle m,
         py::handle l, py::handle acc, py::handle best, py::handle u, py::object image_bias, float key_scale,
         bool provenance, int64_t tiles_per_chunk, int threads, const std::string& isa) {
        const int code = runnable_isa(isa);
        check_positive("tiles_per_chunk", tiles_per_chunk);
        check_positive("threads", threads);
        elsfast::binding::Tensors tensors("elsfast._cpu.reduce", "cpu");
        const auto shared = elsfast::binding::reduction_tensors<float>(
            tensors, q, images, key_offsets, value_offsets, m, l, acc, best, u, "float32", cpu::kMaxE, key_scale,
            provenance);
        const float* bias = nullptr;
        if (!image_bias.is_none()) bias = reinterpret_cast<const float*>(tensors(image_bias, "image_bias", "N", {"float32"}));
        const cpu::Args args{shared, bias, tiles_per_chunk, threads, code};
        py::gil_scoped_release release;
        cpu::reduce(args);
      },
      "Fold every group's dictionary into K partial states per query (see csrc/reduce_args.h, cpu_reduce.h): q "
      "(G, M, D) float32, images (N, pixels) uint8 or float32, key_offsets (G, S, D) and value_offsets (G, S, E) "
      "int32, outputs m, l, u (K, G, M) and acc (K, G, M, E) float32, best (K, G, M) int64; `image_bias` None or "
      "(N,) float32 bits added to the logits of each image's entries.",
      py::kw_only(), py::arg("q"), py::arg("images"), py::arg("key_offsets"), py::arg("value_offsets"),
      py::arg("m"), py::arg("l"), py::arg("acc"), py::arg("best"), py::arg("u"), py::arg("image_bias"),
      py::arg("key_scale"), py::arg("provenance"), py::arg("tiles_per_chunk"), py::arg("threads"), py::arg("isa"));
  module.def(
      "lanes", [](const std::string& isa) { return cpu::lanes(runnable_isa(isa)); },
      "Training images a vector lane block of the displacement kernel holds under `isa`.");
  module.def(
      "reduce_shifts",
      [](py::handle x, py::handle images, py::handle groups, py::handle m, py::handle l, py::handle acc,
         int64_t patch_size, float q_scale, float key_scale, int threads, const std::string& isa) {
        const int code = runnable_isa(isa);
        check_positive("threads", threads);
        if (patch_size < 1 || patch_size % 2 == 0)
          throw py::value_error("elsfast._cpu.reduce_shifts: patch_size must be odd and positive");
        elsfast::binding::Tensors t("elsfast._cpu.reduce_shifts", "cpu");
        const auto x_ptr = t(x, "x", "BCYX", {"float32"});
        const auto images_ptr = t(images, "images", "NCHW", {"uint8", "float32"});
        const auto groups_ptr = t(groups, "groups", "GR", {"int32"});
        const auto m_ptr = t(m, "m", "KGM", {"float32"});
        const auto l_ptr = t(l, "l", "KGM", {"float32"});
        const auto acc_ptr = t(acc, "acc", "KGMC", {"float32"});
        const int64_t H = t.size('H'), W = t.size('W');
        if (t.size('Y') != H + patch_size - 1 || t.size('X') != W + patch_size - 1)
          t.fail("x", "must be the query images zero-padded by patch_size // 2: (B, C, H + P - 1, W + P - 1)");
        t.size('R', 4, 4);
        const cpu::ShiftArgs args{reinterpret_cast<const float*>(x_ptr),
                                  reinterpret_cast<const void*>(images_ptr),
                                  reinterpret_cast<const int32_t*>(groups_ptr),
                                  reinterpret_cast<float*>(m_ptr),
                                  reinterpret_cast<float*>(l_ptr),
                                  reinterpret_cast<float*>(acc_ptr),
                                  t.size('B'), t.size('C', 1, cpu::kMaxE), H, W, t.size('N'), t.size('G'),
                                  t.size('M'), patch_size, t.size('K'), q_scale, key_scale,
                                  t.dtype("images") == "uint8", threads, code};
        py::gil_scoped_release release;
        cpu::reduce_shifts(args);
      },
      "Fold every group's dictionary into K partial states per query with the displacement kernel (see "
      "csrc/cpu_reduce.h: ShiftArgs): x (B, C, H + P - 1, W + P - 1) float32 zero-padded query images, images "
      "(N, C, H, W) uint8 or float32, groups (G, 4) int32, outputs m, l (K, G, M) and acc (K, G, M, C) float32.",
      py::kw_only(), py::arg("x"), py::arg("images"), py::arg("groups"), py::arg("m"), py::arg("l"), py::arg("acc"),
      py::arg("patch_size"), py::arg("q_scale"), py::arg("key_scale"), py::arg("threads"), py::arg("isa"));
}
