// Host entry points of batch_norm in batch-statistics mode (batch_norm/batch_norm_cpu.cpp;
// the op: fastmaml/ops/_batch_norm.py).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fastmaml {

// x: contiguous [N, C, L] (layout 0) or [N, L, C] (layout 1: channels last); w, b, mean,
// rstd: [C]; dtype: 0 float32, 1 float64. Pointers
// that may be 0 (= absent): dx; a, bw, bb (zero cotangents); g_gy, g_x.
void batch_norm_fwd_cpu(int dtype, int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                        std::uintptr_t b, std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd, double eps,
                        int threads);
void batch_norm_bwd_cpu(int dtype, int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                        std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t dx,
                        std::uintptr_t dw, std::uintptr_t db, int threads);
void batch_norm_bwd_bwd_cpu(int dtype, int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                            std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t a,
                            std::uintptr_t bw, std::uintptr_t bb, std::uintptr_t g_gy, std::uintptr_t g_x,
                            std::uintptr_t g_w, int threads);

}  // namespace fastmaml
