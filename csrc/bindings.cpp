// pybind11 module elsfast._cuda: raw pointers (tensor.data_ptr()) and the stream as integers, so the module
// needs neither torch headers nor the torch ABI at build time (TOOLCHAIN.md). Shapes are checked in
// elsfast/reduce/cuda_backend.py, which owns the tensors.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "reduce.h"

namespace py = pybind11;

namespace {

elsfast::ReduceArgs make_args(std::uintptr_t q, std::uintptr_t images, std::uintptr_t key_offsets,
                              std::uintptr_t value_offsets, std::uintptr_t m, std::uintptr_t l, std::uintptr_t acc,
                              std::uintptr_t best, std::uintptr_t u, int64_t G, int64_t M, int64_t N, int64_t S,
                              int64_t D, int64_t E, int64_t pixels_per_image, int64_t entries_per_split,
                              int64_t splits, float key_scale, bool uint8, bool provenance) {
  if (E < 1 || E > elsfast::kMaxE) throw std::invalid_argument("elsfast._cuda: value channels must be 1..4");
  if (G < 1 || M < 1 || N < 1 || S < 1 || D < 1 || splits < 1 || entries_per_split < 1)
    throw std::invalid_argument("elsfast._cuda: sizes must be positive");
  return {reinterpret_cast<const float*>(q),
          reinterpret_cast<const void*>(images),
          reinterpret_cast<const int32_t*>(key_offsets),
          reinterpret_cast<const int32_t*>(value_offsets),
          reinterpret_cast<float*>(m),
          reinterpret_cast<double*>(l),
          reinterpret_cast<double*>(acc),
          reinterpret_cast<int64_t*>(best),
          reinterpret_cast<double*>(u),
          G, M, N, S, D, E, pixels_per_image, entries_per_split, splits, key_scale, uint8, provenance};
}

}  // namespace

PYBIND11_MODULE(_cuda, module) {
  module.doc() = "elsfast's fused CUDA reduction (csrc/). Pointers are integers; see elsfast/reduce/cuda_backend.py.";
  module.attr("BLOCK_Q") = elsfast::kBlockQ;
  module.attr("TILE_N") = elsfast::kTileN;
  module.attr("MAX_E") = elsfast::kMaxE;
  module.def(
      "reduce",
      [](std::uintptr_t q, std::uintptr_t images, std::uintptr_t key_offsets, std::uintptr_t value_offsets,
         std::uintptr_t m, std::uintptr_t l, std::uintptr_t acc, std::uintptr_t best, std::uintptr_t u, int64_t G,
         int64_t M, int64_t N, int64_t S, int64_t D, int64_t E, int64_t pixels_per_image, int64_t entries_per_split,
         int64_t splits, float key_scale, bool uint8, bool provenance, std::uintptr_t stream, bool host,
         int device) {
        const auto args = make_args(q, images, key_offsets, value_offsets, m, l, acc, best, u, G, M, N, S, D, E,
                                    pixels_per_image, entries_per_split, splits, key_scale, uint8, provenance);
        if (host) {
          py::gil_scoped_release release;
          elsfast::reduce_host(args);
          return;
        }
        if (device < 0) throw std::invalid_argument("elsfast._cuda: device must be the tensors' CUDA device index");
        if (const char* error = elsfast::launch_reduce(args, stream, device)) throw std::runtime_error(error);
      },
      "Fold the dictionary into per-split partial states (see csrc/reduce.h). host=True runs the kernel's "
      "algorithm serially on host pointers (tests without a GPU); otherwise launches on `stream` of CUDA device "
      "`device` (the tensors' device index).",
      py::arg("q"), py::arg("images"), py::arg("key_offsets"), py::arg("value_offsets"), py::arg("m"), py::arg("l"),
      py::arg("acc"), py::arg("best"), py::arg("u"), py::arg("G"), py::arg("M"), py::arg("N"), py::arg("S"),
      py::arg("D"), py::arg("E"), py::arg("pixels_per_image"), py::arg("entries_per_split"), py::arg("splits"),
      py::arg("key_scale"), py::arg("uint8"), py::arg("provenance"), py::arg("stream"), py::arg("host"),
      py::arg("device") = -1);
}
