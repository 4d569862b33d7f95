// pybind11 bindings of fastmaml._C: one registration per op. The module does not link
// against PyTorch: tensors cross as data pointers (ints), sizes and strides, and CUDA
// streams as integer handles. All checking happens in Python first
// (fastmaml/_checks.py); the launchers re-check what they rely on.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "ops.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef FASTMAML_CUDA_REASON
#define FASTMAML_CUDA_REASON ""
#endif

namespace py = pybind11;
using namespace fastmaml;

namespace {

#ifdef FASTMAML_WITH_CUDA
constexpr bool kCudaCompiled = true;
#else
constexpr bool kCudaCompiled = false;
// Without nvcc the CUDA entry points still exist and raise a clear error.
[[noreturn]] void no_cuda() {
  throw std::runtime_error(std::string("fastmaml._C was built without CUDA: ") + FASTMAML_CUDA_REASON);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmaml compiled kernels (C++/OpenMP and CUDA); takes raw pointers, see fastmaml.ops";
  m.attr("cuda_compiled") = kCudaCompiled;
  m.attr("cuda_reason") = std::string(kCudaCompiled ? "" : FASTMAML_CUDA_REASON);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  m.attr("compiler") = std::string(__VERSION__);

  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
  });
  m.def("cuda_device_count", []() {
#ifdef FASTMAML_WITH_CUDA
    std::string err;
    int n = cuda_device_count(&err);
    return py::make_tuple(n, err);
#else
    return py::make_tuple(0, std::string("built without CUDA: ") + FASTMAML_CUDA_REASON);
#endif
  }, "(number of CUDA devices, error message or '')");
  m.def("cuda_runtime_version", []() {
#ifdef FASTMAML_WITH_CUDA
    return cuda_runtime_version();
#else
    return 0;
#endif
  });

  // ---- ops (one block per op) ----------------------------------------------------

  // mlp_loss_and_grad / mlp_hvp / maml_mlp (csrc/mlp.h)
  m.def("mlp_loss_and_grad_cpu", &mlp_loss_and_grad_cpu, "per-task MLP loss [T] and gradient (CPU)");
  m.def("mlp_hvp_cpu", &mlp_hvp_cpu, "per-task MLP Hessian-vector product (CPU)");
  m.def("maml_mlp_workspace_elems", &maml_mlp_workspace_elems, "per-task workspace of maml_mlp (elements)");
  m.def("maml_mlp_cpu", &maml_mlp_cpu, "fused MAML meta-step of an MLP: forward (+ adjoint) (CPU)");
#ifdef FASTMAML_WITH_CUDA
  m.def("mlp_loss_and_grad_cuda", &mlp_loss_and_grad_cuda);
  m.def("mlp_hvp_cuda", &mlp_hvp_cuda);
  m.def("maml_mlp_cuda", &maml_mlp_cuda);
  m.def("maml_mlp_cuda_smem_limit", &maml_mlp_cuda_smem_limit);
#else
  m.def("mlp_loss_and_grad_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("mlp_hvp_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("maml_mlp_cuda", [](py::args, py::kwargs) { no_cuda(); });
  m.def("maml_mlp_cuda_smem_limit", [](int) -> int64_t { no_cuda(); });
#endif
}
