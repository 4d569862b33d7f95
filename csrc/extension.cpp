// fastmaml._C: the pybind11 module. Each op folder registers its own bindings
// (csrc/<op>/bindings.cpp); the module does not link against PyTorch (tensors cross as
// data pointers, see common/bindings.h).
#include "common/bindings.h"

PYBIND11_MODULE(_C, m) {
  using namespace fastmaml::bind;
  m.doc() = "fastmaml compiled kernels (C++/OpenMP and CUDA); takes raw pointers, see fastmaml.ops";
  register_common(m);
  register_multi_tensor(m);
  register_sgd_step(m);
  register_batch_norm(m);
  register_mlp(m);
}
