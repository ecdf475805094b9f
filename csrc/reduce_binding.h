// What the pybind11 modules elsfast._cpu and elsfast._cuda share: their arguments are torch tensors, read through
// torch's Python API (dtype, device, contiguity, shape, data_ptr) so that the modules need no torch headers and
// no torch ABI (TOOLCHAIN.md), and every size the kernels use is read off the tensors' shapes: no integer can be
// passed in the wrong place. Each tensor is checked before any pointer reaches a kernel.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <map>
#include <stdexcept>
#include <string>

#include "reduce_args.h"

namespace elsfast {
// Hidden: both extensions hold a copy of these inline functions, and a process loads both (torch may load modules
// with RTLD_GLOBAL); each module must call its own.
#pragma GCC visibility push(hidden)
namespace binding {

namespace py = pybind11;

// Checks the tensor arguments of one call on one device. Shapes are given as letters ("GMD"): the first tensor
// that has a letter fixes its size, every later one must agree.
class Tensors {
 public:
  // `function`: the name errors start with; `device`: the device type every tensor must be on ("cpu", "cuda").
  Tensors(std::string function, std::string device) : function_(std::move(function)), device_(std::move(device)) {}

  // The data pointer of `tensor` after checking that it is a contiguous tensor on the device with one of `dtypes`
  // ("uint8", "float32", ...) and the shape `dims`.
  std::uintptr_t operator()(py::handle tensor, const char* name, const char* dims,
                            std::initializer_list<const char*> dtypes) {
    static py::handle tensor_type = py::object(py::module_::import("torch").attr("Tensor")).release();
    if (!py::isinstance(tensor, tensor_type)) fail(name, "must be a torch.Tensor, got " + type_name(tensor));
    const std::string dtype = py::str(tensor.attr("dtype")).cast<std::string>().substr(6);  // "torch.float32"
    bool dtype_ok = false;
    std::string wanted;
    for (const char* d : dtypes) {
      dtype_ok = dtype_ok || dtype == d;
      wanted += (wanted.empty() ? "" : " or ") + std::string(d);
    }
    if (!dtype_ok) fail(name, "must be " + wanted + ", got " + dtype);
    const py::object device = tensor.attr("device");
    const std::string type = py::str(device.attr("type")).cast<std::string>();
    const py::object index = device.attr("index");
    const int device_index = index.is_none() ? -1 : index.cast<int>();
    if (type != device_) fail(name, "must be on " + device_ + ", got " + type);
    if (device_index_set_ && device_index != device_index_)
      fail(name, "is on device index " + std::to_string(device_index) + ", the other tensors on " +
                     std::to_string(device_index_));
    device_index_ = device_index;
    device_index_set_ = true;
    if (!tensor.attr("is_contiguous")().cast<bool>()) fail(name, "must be contiguous");
    const py::tuple shape = py::tuple(tensor.attr("shape"));
    const std::string expected(dims);
    if (shape.size() != expected.size())
      fail(name, "must have " + std::to_string(expected.size()) + " dimensions (" + expected + "), got shape " +
                     shape_text(shape));
    for (size_t i = 0; i < expected.size(); ++i) {
      const int64_t n = shape[i].cast<int64_t>();
      const auto known = sizes_.find(expected[i]);
      if (known == sizes_.end()) {
        sizes_[expected[i]] = n;
      } else if (known->second != n) {
        fail(name, "has shape " + shape_text(shape) + " (" + expected + "), but " + expected[i] + " = " +
                       std::to_string(known->second) + " in the tensors before it");
      }
    }
    dtypes_[name] = dtype;
    return tensor.attr("data_ptr")().cast<std::uintptr_t>();
  }

  // The size of dimension `letter` fixed by the tensors checked so far; raises unless it is in [lo, hi].
  int64_t size(char letter, int64_t lo = 1, int64_t hi = INT64_MAX) const {
    const int64_t n = sizes_.at(letter);
    if (n < lo || n > hi)
      throw py::value_error(function_ + ": size " + letter + " = " + std::to_string(n) + " must be in [" +
                            std::to_string(lo) + ", " + (hi == INT64_MAX ? "inf" : std::to_string(hi)) + "]");
    return n;
  }

  const std::string& dtype(const char* name) const { return dtypes_.at(name); }
  int device_index() const { return device_index_; }

  [[noreturn]] void fail(const char* name, const std::string& what) const {
    throw py::value_error(function_ + ": " + name + " " + what);
  }

 private:
  static std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")); }
  static std::string shape_text(const py::tuple& shape) { return py::str(shape).cast<std::string>(); }

  std::string function_, device_;
  std::map<char, int64_t> sizes_;
  std::map<std::string, std::string> dtypes_;
  int device_index_ = -1;
  bool device_index_set_ = false;
};

// The shared arguments of both reductions from their tensors: q (G, M, D) float32, images (N, P) uint8 or float32,
// key_offsets (G, S, D) and value_offsets (G, S, E) int32, the partial states m, l, u, best (K, G, M) and acc
// (K, G, M, E), their sums in `sum_dtype`; at most `max_e` value channels.
template <typename Sum>
ReductionTensors<Sum> reduction_tensors(Tensors& t, py::handle q, py::handle images, py::handle key_offsets,
                                        py::handle value_offsets, py::handle m, py::handle l, py::handle acc,
                                        py::handle best, py::handle u, const char* sum_dtype, int max_e,
                                        float key_scale, bool provenance) {
  ReductionTensors<Sum> a{};
  a.q = reinterpret_cast<const float*>(t(q, "q", "GMD", {"float32"}));
  a.images = reinterpret_cast<const void*>(t(images, "images", "NP", {"uint8", "float32"}));
  a.key_offsets = reinterpret_cast<const int32_t*>(t(key_offsets, "key_offsets", "GSD", {"int32"}));
  a.value_offsets = reinterpret_cast<const int32_t*>(t(value_offsets, "value_offsets", "GSE", {"int32"}));
  a.m = reinterpret_cast<float*>(t(m, "m", "KGM", {"float32"}));
  a.l = reinterpret_cast<Sum*>(t(l, "l", "KGM", {sum_dtype}));
  a.acc = reinterpret_cast<Sum*>(t(acc, "acc", "KGME", {sum_dtype}));
  a.best = reinterpret_cast<int64_t*>(t(best, "best", "KGM", {"int64"}));
  a.u = reinterpret_cast<Sum*>(t(u, "u", "KGM", {sum_dtype}));
  a.G = t.size('G');
  a.M = t.size('M');
  a.N = t.size('N');
  a.S = t.size('S');
  a.D = t.size('D');
  a.E = t.size('E', 1, max_e);
  a.pixels_per_image = t.size('P');
  a.splits = t.size('K');
  a.key_scale = key_scale;
  a.uint8 = t.dtype("images") == "uint8";
  a.provenance = provenance;
  return a;
}

}  // namespace binding
#pragma GCC visibility pop
}  // namespace elsfast
