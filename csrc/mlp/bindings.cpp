// Bindings of mlp_loss_and_grad / mlp_hvp / maml_mlp (mlp/mlp.h; the ops:
// fastmaml/ops/mlp.py, fastmaml/ops/_maml_mlp/).
#include "common/bindings.h"
#include "mlp/mlp_api.h"

namespace fastmaml {
namespace bind {

void register_mlp(py::module_& m) {
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

}  // namespace bind
}  // namespace fastmaml
