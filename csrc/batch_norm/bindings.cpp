// Bindings of batch_norm in batch-statistics mode (batch_norm/batch_norm_cpu.cpp; the op:
// fastmaml/ops/_batch_norm.py). Raw pointers, no checks here: the Python caller
// allocates and validates every tensor.
#include "batch_norm/batch_norm_api.h"
#include "common/bindings.h"

namespace fastmaml {
namespace bind {

void register_batch_norm(py::module_& m) {
  m.def("batch_norm_fwd_cpu", &batch_norm_fwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "(dtype, layout, N, C, L, x, w, b, y, mean, rstd, eps, threads): y, mean, rstd of batch-statistics BN (CPU)");
  m.def("batch_norm_bwd_cpu", &batch_norm_bwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "(dtype, layout, N, C, L, x, w, mean, rstd, gy, dx, dw, db, threads): its backward (CPU; dx may be 0)");
  m.def("batch_norm_bwd_bwd_cpu", &batch_norm_bwd_bwd_cpu, py::call_guard<py::gil_scoped_release>(),
        "(dtype, layout, N, C, L, x, w, mean, rstd, gy, a, bw, bb, g_gy, g_x, g_w, threads): its double backward (CPU); layout 0: x [N, C, L], 1: [N, L, C]");
}

}  // namespace bind
}  // namespace fastmaml
