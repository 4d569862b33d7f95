// mlp: the dense primitives specialised for the GPU policy (CtaGroup, one CTA = one
// task): thread-strided loops; the interface is that of mlp/cpu_primitives.h.
#pragma once

#include "mlp/layout.h"

namespace fastmaml {
namespace mlp {

#if defined(__CUDACC__)
// Each thread owns whole output elements and sums its reduction sequentially: no atomics,
// so the result does not depend on scheduling.
template <class S>
__device__ __forceinline__ void transpose(CtaGroup g, int R, int C, const S* in, S* out) {
  for (int i = g.rank(); i < R * C; i += g.size()) {
    const int r = i / C, c = i % C;
    out[int64_t(c) * R + r] = in[i];
  }
}
template <class S>
__device__ __forceinline__ void gemm_tn(CtaGroup g, int M, int P, int Q, const S* A1, const S* B1, const S* A2,
                                        const S* B2, S* C) {
  for (int i = g.rank(); i < P * Q; i += g.size()) {
    const int p = i / Q, q = i % Q;
    S t = S(0);
    for (int m = 0; m < M; ++m) t += A1[int64_t(m) * P + p] * B1[int64_t(m) * Q + q];
    if (A2)
      for (int m = 0; m < M; ++m) t += A2[int64_t(m) * P + p] * B2[int64_t(m) * Q + q];
    C[i] = t;
  }
}
template <class S>
__device__ __forceinline__ void gemm_nn(CtaGroup g, int M, int Q, int P1, const S* A1, const S* B1, int P2,
                                        const S* A2, const S* B2, S* C, const S* bias) {
  for (int i = g.rank(); i < M * Q; i += g.size()) {
    const int m = i / Q, q = i % Q;
    S t = bias ? bias[q] : S(0);
    for (int p = 0; p < P1; ++p) t += A1[int64_t(m) * P1 + p] * B1[int64_t(p) * Q + q];
    if (A2)
      for (int p = 0; p < P2; ++p) t += A2[int64_t(m) * P2 + p] * B2[int64_t(p) * Q + q];
    C[i] = t;
  }
}
template <class S>
__device__ __forceinline__ void colsum(CtaGroup g, int M, int P, const S* A, S* c, bool acc) {
  for (int p = g.rank(); p < P; p += g.size()) {
    S t = acc ? c[p] : S(0);
    for (int m = 0; m < M; ++m) t += A[int64_t(m) * P + p];
    c[p] = t;
  }
}
// Fixed-shape tree reduction in shared scratch (blockDim.x entries), deterministic.
template <class S>
__device__ __forceinline__ S group_sum(CtaGroup g, S v, S* scratch) {
  const int n = g.size(), r = g.rank();
  g.sync();
  scratch[r] = v;
  g.sync();
  for (int half = 1; half < n; half *= 2) {
    if (r % (2 * half) == 0 && r + half < n) scratch[r] += scratch[r + half];
    g.sync();
  }
  S out = scratch[0];
  g.sync();
  return out;
}
#endif

}  // namespace mlp
}  // namespace fastmaml
