// pybind11 bindings of fastmaml._C: one registration per op. The module does not link
// against PyTorch: tensors cross as data pointers (ints), sizes and strides, and CUDA
// streams as integer handles. All checking happens in Python first
// (fastmaml/_checks.py); the launchers re-check what they rely on.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "multi_tensor.h"
#include "ops.h"
#include "sgd_step.h"

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

using PtrList = std::vector<std::uintptr_t>;

SgdStepArgs sgd_step_args(const PtrList& theta, const PtrList& grad, const std::vector<std::int64_t>& numel,
                          const std::vector<int>& shared, std::int64_t tasks, int dtype, int lr_mode,
                          double lr_value, const PtrList& lr) {
  SgdStepArgs a;
  a.theta = theta;
  a.grad = grad;
  a.numel = numel;
  a.shared = shared;
  a.tasks = tasks;
  a.dtype = dtype;
  a.lr_mode = lr_mode;
  a.lr_value = lr_value;
  a.lr = lr;
  return a;
}

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

  // sgd_step (csrc/sgd_step.h). Lists hold one entry per tensor; theta entries of a
  // shared θ point at [N] data, all others at [T, N]; a 0 output pointer = not requested.
  m.def("sgd_step_fwd_cpu",
        [](const PtrList& theta, const PtrList& grad, const PtrList& out, const std::vector<std::int64_t>& numel,
           const std::vector<int>& shared, std::int64_t tasks, int dtype, int lr_mode, double lr_value,
           const PtrList& lr) {
          SgdStepArgs a = sgd_step_args(theta, grad, numel, shared, tasks, dtype, lr_mode, lr_value, lr);
          py::gil_scoped_release nogil;
          sgd_step_fwd_cpu(a, out);
        },
        py::arg("theta"), py::arg("grad"), py::arg("out"), py::arg("numel"), py::arg("shared"), py::arg("tasks"),
        py::arg("dtype"), py::arg("lr_mode"), py::arg("lr_value"), py::arg("lr"));
  m.def("sgd_step_bwd_cpu",
        [](const PtrList& v, const PtrList& grad, const std::vector<std::int64_t>& numel,
           const std::vector<int>& shared, std::int64_t tasks, int dtype, int lr_mode, double lr_value,
           const PtrList& lr, const PtrList& dtheta, const PtrList& dgrad, const PtrList& dlr) {
          // θ is not read by the backward; v stands in for it in the shared argument checks.
          SgdStepArgs a = sgd_step_args(v, grad, numel, shared, tasks, dtype, lr_mode,
                                        lr_value, lr);
          py::gil_scoped_release nogil;
          sgd_step_bwd_cpu(a, v, dtheta, dgrad, dlr);
        },
        py::arg("v"), py::arg("grad"), py::arg("numel"), py::arg("shared"), py::arg("tasks"), py::arg("dtype"),
        py::arg("lr_mode"), py::arg("lr_value"), py::arg("lr"), py::arg("dtheta"), py::arg("dgrad"),
        py::arg("dlr"));
  m.def("sgd_step_fwd_cuda",
        [](const PtrList& theta, const PtrList& grad, const PtrList& out, const std::vector<std::int64_t>& numel,
           const std::vector<int>& shared, std::int64_t tasks, int dtype, int lr_mode, double lr_value,
           const PtrList& lr, int device, std::uintptr_t stream, bool force_index64) {
#ifdef FASTMAML_WITH_CUDA
          SgdStepArgs a = sgd_step_args(theta, grad, numel, shared, tasks, dtype, lr_mode, lr_value, lr);
          py::gil_scoped_release nogil;
          sgd_step_fwd_cuda(a, out, device, stream, force_index64);
#else
          no_cuda();
#endif
        },
        py::arg("theta"), py::arg("grad"), py::arg("out"), py::arg("numel"), py::arg("shared"), py::arg("tasks"),
        py::arg("dtype"), py::arg("lr_mode"), py::arg("lr_value"), py::arg("lr"), py::arg("device"),
        py::arg("stream"), py::arg("force_index64") = false);
  m.def("sgd_step_bwd_cuda",
        [](const PtrList& v, const PtrList& grad, const std::vector<std::int64_t>& numel,
           const std::vector<int>& shared, std::int64_t tasks, int dtype, int lr_mode, double lr_value,
           const PtrList& lr, const PtrList& dtheta, const PtrList& dgrad, const PtrList& dlr, int device,
           std::uintptr_t stream, bool force_index64) {
#ifdef FASTMAML_WITH_CUDA
          // θ is not read by the backward; v stands in for it in the shared argument checks.
          SgdStepArgs a = sgd_step_args(v, grad, numel, shared, tasks, dtype, lr_mode,
                                        lr_value, lr);
          py::gil_scoped_release nogil;
          sgd_step_bwd_cuda(a, v, dtheta, dgrad, dlr, device, stream, force_index64);
#else
          no_cuda();
#endif
        },
        py::arg("v"), py::arg("grad"), py::arg("numel"), py::arg("shared"), py::arg("tasks"), py::arg("dtype"),
        py::arg("lr_mode"), py::arg("lr_value"), py::arg("lr"), py::arg("dtheta"), py::arg("dgrad"),
        py::arg("dlr"), py::arg("device"), py::arg("stream"), py::arg("force_index64") = false);
  // The chunk tables of an apex-style multi-tensor launch (csrc/multi_tensor.h), exposed
  // so their logic (including > 2^31-element tensors) is tested without a GPU.
  m.def("multi_tensor_plan",
        [](const std::vector<std::int64_t>& cols, std::int64_t rows, std::int64_t col_chunk, std::int64_t row_chunk,
           int max_tensors, int max_blocks) {
          MultiTensorPlan p = plan_multi_tensor(cols, rows, col_chunk, row_chunk, max_tensors, max_blocks);
          py::list launches;
          for (const LaunchPlan& l : p.launches) {
            py::dict d;
            d["tensors"] = l.tensors;
            d["block_slot"] = l.block_slot;
            d["block_col"] = l.block_col;
            d["block_row"] = l.block_row;
            d["first_block"] = l.first_block;
            launches.append(d);
          }
          py::dict out;
          out["launches"] = launches;
          out["tensor_first_block"] = p.tensor_first_block;
          out["tensor_blocks"] = p.tensor_blocks;
          out["total_blocks"] = p.total_blocks;
          out["needs_index64"] = p.needs_index64;
          return out;
        },
        py::arg("cols"), py::arg("rows"), py::arg("col_chunk"), py::arg("row_chunk"), py::arg("max_tensors"),
        py::arg("max_blocks"));
  m.attr("SGD_STEP_CUDA_TABLE") = py::make_tuple(kSgdStepMaxTensors, kSgdStepMaxBlocks, kSgdStepBlockThreads,
                                                 kSgdStepFwdRows);

  // mlp_loss_and_grad / mlp_hvp / maml_mlp (csrc/mlp.h)
  m.def("mlp_loss_and_grad_cpu", &mlp_loss_and_grad_cpu, "per-task MLP loss [T] and gradient (CPU)");
  m.def("mlp_hvp_cpu", &mlp_hvp_cpu, "per-task MLP Hessian-vector product (CPU)");
  m.def("maml_mlp_workspace_elems", &maml_mlp_workspace_elems, "per-task workspace of maml_mlp (elements)");
  m.def("maml_mlp_cpu", &maml_mlp_cpu, "fused MAML meta-step of an MLP: forward (+ adjoint) (CPU)");
  m.def("first_nonfinite_cpu", &first_nonfinite_cpu,
        "index of the first contiguous float tensor (pointers, element counts) holding NaN/Inf, or -1 (CPU)");
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
