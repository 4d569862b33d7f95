// Host entry points of the MLP ops: the CPU launchers (mlp/mlp_cpu.cpp) and the CUDA
// launchers (mlp/mlp_cuda.cu, only with FASTMAML_WITH_CUDA). The algorithms are in
// mlp/mlp.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmaml {

// dims: [d_0, ..., d_L]; act: 0 relu, 1 tanh; loss: 0 mse, 1 cross_entropy; dtype: 0/1.
// Pointer lists hold one pointer per layer (W_l [T, d_l, d_{l-1}], b_l [T, d_l]).
void mlp_loss_and_grad_cpu(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int N,
                           std::uintptr_t x, std::uintptr_t y, const std::vector<std::uintptr_t>& W,
                           const std::vector<std::uintptr_t>& b, std::uintptr_t out_loss,
                           const std::vector<std::uintptr_t>& gW, const std::vector<std::uintptr_t>& gb);
void mlp_hvp_cpu(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int N, std::uintptr_t x,
                 std::uintptr_t y, const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
                 const std::vector<std::uintptr_t>& vW, const std::vector<std::uintptr_t>& vb,
                 const std::vector<std::uintptr_t>& hW, const std::vector<std::uintptr_t>& hb);
// Index of the first contiguous float tensor (pointers, element counts) holding NaN/Inf, or -1.
int64_t first_nonfinite_cpu(int dtype, const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& counts);
// Per-task workspace of the fused meta-step, in elements of the scalar type.
// lr_learned: the K support gradients are kept for dα; n_msl: steps with a nonzero MSL weight.
int64_t maml_mlp_workspace_elems(const std::vector<int>& dims, int K, int Ns, int Nq, bool lr_learned, int n_msl);
// The fused MAML meta-step (forward, and with need_grad the adjoint, in one call). W/b:
// shared θ ([d_l, d_{l-1}], [d_l]); lr_mode 0 scalar (lr pointer or lr_value), 1 [K, 2L],
// 2 [P], 3 [K, P]; msl: [K] weights; outputs: loss [1], dθ as 2L pointers (W_1, b_1, ...;
// empty when !need_grad), dlr [n_lr] (n_lr = 0: lr not learned).
void maml_mlp_cpu(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int K, int Ns, int Nq,
                  const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b, std::uintptr_t xs,
                  std::uintptr_t ys, std::uintptr_t xq, std::uintptr_t yq, int lr_mode, std::uintptr_t lr,
                  double lr_value, std::uintptr_t msl, bool first_order, bool need_grad, int64_t n_lr,
                  std::uintptr_t out_loss, const std::vector<std::uintptr_t>& out_dtheta, std::uintptr_t out_dlr);
#ifdef FASTMAML_WITH_CUDA
void mlp_loss_and_grad_cuda(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int N,
                            std::uintptr_t x, std::uintptr_t y, const std::vector<std::uintptr_t>& W,
                            const std::vector<std::uintptr_t>& b, std::uintptr_t out_loss,
                            const std::vector<std::uintptr_t>& gW, const std::vector<std::uintptr_t>& gb,
                            std::uintptr_t stream);
void mlp_hvp_cuda(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int N, std::uintptr_t x,
                  std::uintptr_t y, const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
                  const std::vector<std::uintptr_t>& vW, const std::vector<std::uintptr_t>& vb,
                  const std::vector<std::uintptr_t>& hW, const std::vector<std::uintptr_t>& hb, std::uintptr_t stream);
// Same as maml_mlp_cpu (n_msl: the number of nonzero MSL weights, which live on the
// device); one CTA per task with its workspace in dynamic shared memory
// (throws when it does not fit: see maml_mlp_cuda_smem_limit), then a second kernel sums
// the per-task partials over tasks in task order. partials: device buffer of
// T * (1 + P + n_lr) elements.
void maml_mlp_cuda(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int K, int Ns, int Nq,
                   const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b, std::uintptr_t xs,
                   std::uintptr_t ys, std::uintptr_t xq, std::uintptr_t yq, int lr_mode, std::uintptr_t lr,
                   double lr_value, std::uintptr_t msl, bool first_order, bool need_grad, int64_t n_lr,
                   int n_msl, std::uintptr_t out_loss, const std::vector<std::uintptr_t>& out_dtheta,
                   std::uintptr_t out_dlr, std::uintptr_t partials, std::uintptr_t stream);
// Largest dynamic shared memory per block (bytes) the fused kernel may use on `device`.
int64_t maml_mlp_cuda_smem_limit(int device);
#endif

}  // namespace fastmaml
