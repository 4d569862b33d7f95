// sgd_step: the fused inner update θ' = θ − α ⊙ g and its backward, as per-element
// FM_HD functors shared by the CPU (sgd_step/sgd_step_cpu.cpp) and CUDA (sgd_step/sgd_step_cuda.cu)
// kernels, so the CPU tests exercise the arithmetic the GPU runs.
//
// Layout (all tensors contiguous, one dtype S = float or double). Tensor i has
// N_i = numel(shape_i) "columns" and T "rows" (tasks):
//   theta_i : [N_i] (shared by the tasks, row stride 0) or [T, N_i] (per task, stride N_i)
//   g_i, out_i, v_i, dg_i : [T, N_i]
//   lr: mode kLrValue   one immediate value (a Python float), not differentiable;
//       mode kLrBroadcast lr_i points at one value (0-d tensor, or element i of a
//                        per-tensor [n] vector);
//       mode kLrElement   lr_i points at N_i values (Meta-SGD), indexed by column.
// Forward:   out[t, j] = theta[t·s, j] − α_j · g[t, j]
// Backward (v = ∂L/∂out):
//   dθ[j]     = Σ_t v[t, j]            (shared θ; per-task θ: dθ = v, nothing to compute)
//   dg[t, j]  = −α_j · v[t, j]
//   dα        = −Σ g ⊙ v, reduced to α's granularity: per column (kLrElement) or
//               over the whole tensor (kLrBroadcast; the Python layer sums the
//               per-tensor values again when one 0-d α is shared by all tensors).
// Reductions over t run inside one thread, in order t = 0..T−1, and reductions over
// columns use a fixed chunking, so results are deterministic (bitwise reproducible
// for a given build and thread/block configuration).
#pragma once

#include "common/common.h"

namespace fastmaml {

// CUDA launch geometry (sgd_step/sgd_step_cuda.cu; exported for tests and docs): tensor and
// block slots of the by-value chunk table, threads per block (one column each), and
// rows (tasks) per block of the forward. The backward gives each block all T rows.
constexpr int kSgdStepMaxTensors = 24;
constexpr int kSgdStepMaxBlocks = 256;
constexpr int kSgdStepBlockThreads = 256;
constexpr int kSgdStepFwdRows = 16;

namespace sgd_step {

// The kernels' lr modes (common/codes.h) under this namespace's short names.
using LrMode = codes::SgdKernelLrMode;
constexpr LrMode kLrValue = codes::kSgdLrValue;
constexpr LrMode kLrBroadcast = codes::kSgdLrBroadcast;
constexpr LrMode kLrElement = codes::kSgdLrElement;

// Accumulator type of the reductions: the storage type (float sums of a few thousand
// terms are well inside float32 rounding of the test tolerance; double stays double).
template <class S>
struct Acc {
  using type = S;
};

// θ' = θ − α·g
template <class S>
struct Forward {
  FM_HD S operator()(S theta, S alpha, S g) const { return theta - alpha * g; }
};

// ∂L/∂g = −α·v
template <class S>
struct GradOfG {
  FM_HD S operator()(S alpha, S v) const { return -alpha * v; }
};

// One task's term of ∂L/∂α = −Σ g·v; the sign is applied once after the sum.
template <class S>
struct LrTerm {
  FM_HD S operator()(S g, S v) const { return g * v; }
};

// The learning rate of column j under each mode (value, broadcast pointer, per element).
template <int Mode, class S, class Index>
FM_HD S lr_at(S value, const S* lr, Index j) {
  if (Mode == kLrValue) return value;
  if (Mode == kLrBroadcast) return lr[0];
  return lr[j];
}

}  // namespace sgd_step
}  // namespace fastmaml
