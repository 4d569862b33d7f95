// The per-task MLP algorithms shared by the CPU (mlp_cpu.cpp) and CUDA (mlp_cuda.cu)
// builds: forward with stored activations, backward, the Hessian-vector product by
// Pearlmutter's R-operator, and the whole MAML meta-step of one task (K inner steps,
// the multi-step query loss and the adjoint recursion of docs/DESIGN.md §1).
//
// Everything is written once against a thread-group policy G (common/common.h): SerialGroup on
// the CPU (one OpenMP thread = one task, barriers are no-ops), CtaGroup on the GPU (one
// CTA = one task). Only the four small dense products (gemm_nt, gemm_tn, gemm_nn,
// colsum) and the in-group sum are specialised per policy: contiguous, register-blocked
// inner loops the compiler vectorises on the CPU; thread-strided loops on the GPU. The
// per-element math (activations, their derivatives, the losses and their Hessians, the
// update, the adjoint) is shared.
//
// Conventions (fastmaml/reference/mlp.py): layer l (1..L) maps d[l-1] -> d[l] with
// W_l [d_l, d_{l-1}] row-major and b_l [d_l]; z_l = h_{l-1} W_lᵀ + b_l; h_l = σ(z_l) for
// l < L, the last layer is linear. Activations of N points are stored point-major
// [N, d_l]. Flat parameter order (learning rates, meta-gradients): W_1, b_1, ..., W_L, b_L.
//
// The parts, in include order: mlp/layout.h (sizes, flat layout, stored activations),
// mlp/math.h (per-element math), mlp/cpu_primitives.h and mlp/gpu_primitives.cuh (the
// dense products per policy), mlp/task.h (the per-task algorithm), mlp/meta_step.h (the
// MAML meta-step of one task). mlp/mlp_api.h declares the host entry points.
#pragma once

#include "mlp/layout.h"
#include "mlp/math.h"
#include "mlp/meta_step.h"
#include "mlp/task.h"
