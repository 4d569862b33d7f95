// Shared pieces of the pybind11 bindings: the per-op registration functions (one per op
// folder, called by extension.cpp) and the fast int-list readers they use. The module
// does not link against PyTorch: tensors cross as data pointers (ints), sizes and
// strides, and CUDA streams as integer handles. All checking happens in Python first
// (fastmaml/_checks.py and each op's checks); the launchers re-check what they rely on.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#ifndef FASTMAML_CUDA_REASON
#define FASTMAML_CUDA_REASON ""
#endif

namespace fastmaml {
namespace bind {

namespace py = pybind11;

// One registration per op folder (csrc/<op>/bindings.cpp).
void register_common(py::module_& m);        // build facts, threads, devices, codes()
void register_multi_tensor(py::module_& m);  // the multi-tensor planner (tested without a GPU)
void register_sgd_step(py::module_& m);
void register_batch_norm(py::module_& m);
void register_mlp(py::module_& m);           // mlp_loss_and_grad, mlp_hvp, maml_mlp

#ifdef FASTMAML_WITH_CUDA
constexpr bool kCudaCompiled = true;
#else
constexpr bool kCudaCompiled = false;
#endif

// Without nvcc the CUDA entry points still exist and raise a clear error.
[[noreturn]] inline void no_cuda() {
  throw std::runtime_error(std::string("fastmaml._C was built without CUDA: ") + FASTMAML_CUDA_REASON);
}

using PtrList = std::vector<std::uintptr_t>;

// A list (or tuple) of Python ints as a vector. pybind11's generic list caster costs
// about 0.1 µs per element; a sinusoid-sized sgd_step call passes ~40 of them, so these
// read the items directly. Non-ints raise TypeError; values that do not fit the element
// type raise OverflowError (pointers, 64-bit sizes) or ValueError (int flags).
template <class T>
inline std::vector<T> int_list(py::handle obj, const char* name) {
  PyObject* seq = obj.ptr();
  if (!PyList_Check(seq) && !PyTuple_Check(seq))
    throw py::type_error(std::string(name) + " must be a list of ints, got " + Py_TYPE(seq)->tp_name);
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  std::vector<T> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!PyLong_Check(item) || PyBool_Check(item))
      throw py::type_error(std::string(name) + "[" + std::to_string(i) + "] must be an int, got " +
                           Py_TYPE(item)->tp_name);
    if constexpr (std::is_unsigned_v<T>) {
      const unsigned long long v = PyLong_AsUnsignedLongLong(item);
      if (PyErr_Occurred()) throw py::error_already_set();
      out[i] = static_cast<T>(v);
    } else {
      const long long v = PyLong_AsLongLong(item);
      if (PyErr_Occurred()) throw py::error_already_set();
      if (v < static_cast<long long>(std::numeric_limits<T>::min()) ||
          v > static_cast<long long>(std::numeric_limits<T>::max()))
        throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] is out of range: " + std::to_string(v));
      out[i] = static_cast<T>(v);
    }
  }
  return out;
}

inline PtrList ptr_list(py::handle obj, const char* name) { return int_list<std::uintptr_t>(obj, name); }

}  // namespace bind
}  // namespace fastmaml
