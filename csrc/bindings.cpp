// pybind11 module elsfast._cuda: tensors in, checked and read through torch's Python API (reduce_binding.h), so
// the module needs neither torch headers nor the torch ABI at build time (TOOLCHAIN.md). The typed call, its
// planning and the custom op around it are elsfast/reduce/cuda_ext.py.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "reduce.h"
#include "reduce_binding.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, module) {
  module.doc() = "elsfast's fused CUDA reduction (csrc/). Tensors in; see elsfast/reduce/cuda_ext.py.";
  module.attr("BLOCK_Q") = elsfast::kBlockQ;
  module.attr("TILE_N") = elsfast::kTileN;
  module.attr("MAX_E") = elsfast::kMaxE;
  module.def(
      "reduce",
      [](py::handle q, py::handle images, py::handle key_offsets, py::handle value_offsets, py::handle m,
         py::handle l, py::handle acc, py::handle best, py::handle u, float key_scale, bool provenance,
         int64_t entries_per_split, std::uintptr_t stream, bool host) {
        elsfast::binding::Tensors tensors("elsfast._cuda.reduce", host ? "cpu" : "cuda");
        elsfast::ReduceArgs args{elsfast::binding::reduction_tensors<double>(
                                     tensors, q, images, key_offsets, value_offsets, m, l, acc, best, u, "float64",
                                     elsfast::kMaxE, key_scale, provenance),
                                 entries_per_split};
        if (entries_per_split < 1 || entries_per_split * args.splits < args.N * args.S)
          throw py::value_error("elsfast._cuda.reduce: entries_per_split * splits must cover the N * S entries");
        if (host) {
          py::gil_scoped_release release;
          elsfast::reduce_host(args);
          return;
        }
        const int device = tensors.device_index();
        if (device < 0) throw py::value_error("elsfast._cuda.reduce: the tensors' CUDA device has no index");
        if (const char* error = elsfast::launch_reduce(args, stream, device)) throw std::runtime_error(error);
      },
      "Fold the dictionary into per-split partial states (see csrc/reduce_args.h): q (G, M, D) float32, images "
      "(N, pixels) uint8 or float32, key_offsets (G, S, D) and value_offsets (G, S, E) int32, outputs m (K, G, M) "
      "float32, l, u (K, G, M) and acc (K, G, M, E) float64, best (K, G, M) int64; split k holds entries "
      "[k entries_per_split, (k + 1) entries_per_split). host=True runs the kernel's algorithm serially on CPU "
      "tensors (tests without a GPU); otherwise launches on `stream` of the tensors' CUDA device.",
      py::kw_only(), py::arg("q"), py::arg("images"), py::arg("key_offsets"), py::arg("value_offsets"),
      py::arg("m"), py::arg("l"), py::arg("acc"), py::arg("best"), py::arg("u"), py::arg("key_scale"),
      py::arg("provenance"), py::arg("entries_per_split"), py::arg("stream"), py::arg("host"));
}
