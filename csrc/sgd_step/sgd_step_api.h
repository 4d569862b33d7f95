// Host entry points of sgd_step: the CPU launcher (sgd_step/sgd_step_cpu.cpp) and the
// CUDA launcher (sgd_step/sgd_step_cuda.cu, compiled only when nvcc is found:
// FASTMAML_WITH_CUDA). The math is in sgd_step/sgd_step.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmaml {

// One call updates every tensor of a parameter list for T tasks. Pointers are data
// pointers of contiguous tensors of one dtype; a pointer of 0 in an output list means
// "not requested". See sgd_step/sgd_step.h for the layout and the math.
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

}  // namespace fastmaml
