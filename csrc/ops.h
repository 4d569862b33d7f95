// Declarations of every host-callable entry point of fastmaml._C. The bindings in
// extension.cpp call these; each op's CPU launcher lives in <op>_cpu.cpp and its CUDA
// launcher in <op>_cuda.cu (compiled only when nvcc is found: FASTMAML_WITH_CUDA).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmaml {

// ---- devices -------------------------------------------------------------------
int cuda_device_count(std::string* error);
int cuda_runtime_version();
// '' when a kernel of this build runs on the current device, else why not.
std::string cuda_probe();

// ---- sgd_step (csrc/sgd_step.h; sgd_step_cpu.cpp, sgd_step_cuda.cu) ---------------
// One call updates every tensor of a parameter list for T tasks. Pointers are data
// pointers of contiguous tensors of one dtype; a pointer of 0 in an output list means
// "not requested". See sgd_step.h for the layout and the math.
struct SgdStepArgs {
  std::vector<std::uintptr_t> theta;  // forward: θ_i ([N_i] if shared[i] else [T, N_i])
  std::vector<std::uintptr_t> grad;   // g_i [T, N_i]
  std::vector<std::uintptr_t> lr;     // α_i (lr_mode 1: one value; 2: N_i values; 0: unused)
  std::vector<std::int64_t> numel;    // N_i
  std::vector<int> shared;            // 1 when θ_i is shared by the tasks
  std::int64_t tasks = 0;             // T
  int dtype = 0;                      // 0 float32, 1 float64
  int lr_mode = 0;                    // 0 immediate value, 1 broadcast pointer, 2 per element
  double lr_value = 0.0;              // lr_mode 0
};
// forward: out_i [T, N_i] = θ_i − α_i ⊙ g_i
void sgd_step_fwd_cpu(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out);
// backward from v_i = ∂L/∂out_i [T, N_i]: dtheta_i [N_i] (shared θ_i only), dgrad_i [T, N_i],
// dlr_i (lr_mode 1: one value = −Σ g_i v_i; lr_mode 2: N_i values = −Σ_t g_i v_i).
void sgd_step_bwd_cpu(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v,
                      const std::vector<std::uintptr_t>& dtheta, const std::vector<std::uintptr_t>& dgrad,
                      const std::vector<std::uintptr_t>& dlr);
void sgd_step_fwd_cuda(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out, int device,
                       std::uintptr_t stream, bool force_index64);
void sgd_step_bwd_cuda(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v,
                       const std::vector<std::uintptr_t>& dtheta, const std::vector<std::uintptr_t>& dgrad,
                       const std::vector<std::uintptr_t>& dlr, int device, std::uintptr_t stream,
                       bool force_index64);
// Checks shared by both launchers (sizes, non-null pointers); throws std::invalid_argument.
void sgd_step_check_args(const SgdStepArgs& a, const std::vector<std::uintptr_t>* out_or_v);
// Raises std::invalid_argument (ValueError) naming the pair when two inputs share memory.
void sgd_step_check_overlap(const SgdStepArgs& a);
// The same check extended to caller-provided outputs (out=): every out[i] separate from
// every input and from the other outputs (out == nullptr: inputs only).
void sgd_step_check_overlap_outputs(const SgdStepArgs& a, const std::vector<std::uintptr_t>* out);

// ---- batch_norm, batch-statistics mode (batch_norm_cpu.cpp; fastmaml/batch_norm.py) ----------
// x: contiguous [N, C, L]; w, b, mean, rstd: [C]; dtype: 0 float32, 1 float64. Pointers
// that may be 0 (= absent): dx; a, bw, bb (zero cotangents); g_gy, g_x.
void batch_norm_fwd_cpu(int dtype, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                        std::uintptr_t b, std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd, double eps,
                        int threads);
void batch_norm_bwd_cpu(int dtype, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                        std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t dx,
                        std::uintptr_t dw, std::uintptr_t db, int threads);
void batch_norm_bwd_bwd_cpu(int dtype, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                            std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t a,
                            std::uintptr_t bw, std::uintptr_t bb, std::uintptr_t g_gy, std::uintptr_t g_x,
                            std::uintptr_t g_w, int threads);

// ---- mlp (mlp.h; mlp_cpu.cpp, mlp_cuda.cu) ---------------------------------------------
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
