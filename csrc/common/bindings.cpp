// Bindings of the build facts, thread control, device queries and the codes of
// common/codes.h (fastmaml._C.codes(), checked against fastmaml/codes.py at import).
#include <string>

#include "common/bindings.h"
#include "common/codes.h"
#include "common/device.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastmaml {
namespace bind {

void register_common(py::module_& m) {
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
  m.def("codes", []() {
    py::dict d;
    d["dtype_float32"] = int(codes::kFloat32);
    d["dtype_float64"] = int(codes::kFloat64);
    d["act_relu"] = int(codes::kRelu);
    d["act_tanh"] = int(codes::kTanh);
    d["loss_mse"] = int(codes::kMse);
    d["loss_cross_entropy"] = int(codes::kCrossEntropy);
    d["mlp_max_layers"] = codes::kMlpMaxLayers;
    d["sgd_kernel_lr_value"] = int(codes::kSgdLrValue);
    d["sgd_kernel_lr_broadcast"] = int(codes::kSgdLrBroadcast);
    d["sgd_kernel_lr_element"] = int(codes::kSgdLrElement);
    d["mlp_lr_scalar"] = int(codes::kMlpLrScalar);
    d["mlp_lr_table"] = int(codes::kMlpLrTable);
    d["mlp_lr_element"] = int(codes::kMlpLrElement);
    d["mlp_lr_step_element"] = int(codes::kMlpLrStepElement);
    return d;
  }, "the codes and modes of csrc/common/codes.h, by name (fastmaml/codes.py holds the same)");
}

}  // namespace bind
}  // namespace fastmaml
