// The per-task MLP algorithms shared by the CPU (mlp_cpu.cpp) and CUDA (mlp_cuda.cu)
// builds: forward with stored activations, backward, the Hessian-vector product by
// Pearlmutter's R-operator, and the whole MAML meta-step of one task (K inner steps,
// the multi-step query loss and the adjoint recursion of DESIGN.md §1).
//
// Everything is written once against a thread-group policy G (common.h): SerialGroup on
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
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

#if defined(__CUDACC__)
#define FM_ALGO __device__ __forceinline__
#else
#define FM_ALGO inline
#endif

namespace fastmaml {
namespace mlp {

constexpr int kMaxLayers = 8;
enum Act : int { kRelu = 0, kTanh = 1 };
enum Loss : int { kMse = 0, kCrossEntropy = 1 };
// Inner learning-rate granularities (DESIGN.md §1); the lr buffer is packed as
// scalar: [1]; table: [K, 2L]; elem: [P] (flat order); step_elem: [K, P].
enum LrMode : int { kLrScalar = 0, kLrTable = 1, kLrElem = 2, kLrStepElem = 3 };

// Layer sizes and the flat parameter layout.
struct Shape {
  int L = 0;
  int d[kMaxLayers + 1] = {};
  int64_t woff[kMaxLayers] = {};  // offset of W_l (l = 0..L-1 here) in the flat vector
  int64_t boff[kMaxLayers] = {};
  int64_t P = 0;                  // number of parameters
  int64_t wtoff[kMaxLayers] = {};  // offset of W_lᵀ in a parameter set's transposed-weight block (after P)
  int64_t PT = 0;                 // P + Σ_l |W_l|: a parameter set with its transposed weights
  int maxd = 0;                   // max(d[0..L])
  int act = kRelu;
  int loss = kMse;
  int64_t sum_d = 0;              // Σ_{l=1..L} d_l
};

inline Shape make_shape(const int* dims, int L, int act, int loss) {
  Shape s;
  require(L >= 1 && L <= kMaxLayers, "number of layers must be in [1, 8]");
  s.L = L;
  s.act = act;
  s.loss = loss;
  int64_t off = 0;
  for (int l = 0; l <= L; ++l) {
    require(dims[l] >= 1, "layer widths must be >= 1");
    s.d[l] = dims[l];
    s.maxd = dims[l] > s.maxd ? dims[l] : s.maxd;
  }
  for (int l = 0; l < L; ++l) {
    s.woff[l] = off;
    off += int64_t(s.d[l + 1]) * s.d[l];
    s.boff[l] = off;
    off += s.d[l + 1];
    s.sum_d += s.d[l + 1];
  }
  s.P = off;
  int64_t woff = 0;
  for (int l = 0; l < L; ++l) {
    s.wtoff[l] = woff;
    woff += int64_t(s.d[l + 1]) * s.d[l];
  }
  s.PT = s.P + woff;
  return s;
}

// Per-layer pointers to one parameter set (θ, a gradient, a tangent, ...). WT[l] is a
// transposed copy of W[l] ([d_{l-1}, d_l]) for the forward products z = h Wᵀ, so that
// every product reads contiguous rows; null where not needed (gradients).
template <class S>
struct Params {
  S* W[kMaxLayers];
  S* b[kMaxLayers];
  S* WT[kMaxLayers];
};

// A flat parameter set: P values in the order W_1, b_1, ..., then (when with_t) the
// transposed weights (PT elements in all).
template <class S>
FM_HD Params<S> flat_params(const Shape& s, S* flat, bool with_t = false) {
  Params<S> p;
  for (int l = 0; l < s.L; ++l) {
    p.W[l] = flat + s.woff[l];
    p.b[l] = flat + s.boff[l];
    p.WT[l] = with_t ? flat + s.P + s.wtoff[l] : nullptr;
  }
  return p;
}

template <class S>
FM_HD Params<const S> as_const(const Params<S>& p) {
  Params<const S> q;
  for (int l = 0; l < kMaxLayers; ++l) {
    q.W[l] = p.W[l];
    q.b[l] = p.b[l];
    q.WT[l] = p.WT[l];
  }
  return q;
}

// Stored activations of one pass over N points: H_l (h_l; h_L = z_L is the output),
// D_l = ∂ℓ/∂z_l and E_l = ∂ℓ/∂h_l (l < L, kept for tanh's σ'' term), each [N, d_l].
template <class S>
struct Acts {
  S* H[kMaxLayers];
  S* D[kMaxLayers];
  S* E[kMaxLayers];
};

FM_HD int64_t acts_size(const Shape& s, int N) { return 3 * int64_t(N) * s.sum_d; }

template <class S>
FM_HD Acts<S> carve_acts(const Shape& s, int N, S* base) {
  Acts<S> a;
  for (int l = 0; l < s.L; ++l) {
    a.H[l] = base;
    base += int64_t(N) * s.d[l + 1];
    a.D[l] = base;
    base += int64_t(N) * s.d[l + 1];
    a.E[l] = base;
    base += int64_t(N) * s.d[l + 1];
  }
  return a;
}

// ---- per-element math (shared) ---------------------------------------------------------
FM_HD float fm_tanh(float x) { return tanhf(x); }
FM_HD double fm_tanh(double x) { return tanh(x); }
FM_HD float fm_exp(float x) { return expf(x); }
FM_HD double fm_exp(double x) { return exp(x); }
FM_HD float fm_log(float x) { return logf(x); }
FM_HD double fm_log(double x) { return log(x); }

template <class S>
FM_HD S act_fwd(int act, S z) {
  return act == kRelu ? ((z > S(0) || z != z) ? z : S(0)) : fm_tanh(z);  // relu(NaN) = NaN, as torch.relu
}
// σ'(z) and σ''(z) written in terms of h = σ(z) (what is stored).
template <class S>
FM_HD S act_d1(int act, S h) {
  return act == kRelu ? (h > S(0) ? S(1) : S(0)) : S(1) - h * h;  // relu: 1[z>0] (torch's choice at 0)
}
template <class S>
FM_HD S act_d2(int act, S h) {
  return act == kRelu ? S(0) : S(-2) * h * (S(1) - h * h);  // tanh'' = −2 tanh (1 − tanh²)
}

// ---- policy-specialised primitives ------------------------------------------------------
// All matrices are contiguous row-major with no padding.
//   gemm_tn: C[P][Q] = Σ_m A1[m][p] B1[m][q] (+ Σ_m A2[m][p] B2[m][q])         (∇W = δᵀ h)
//   gemm_nn: C[M][Q] = bias[q] + Σ_p A1[m][p] B1[p][q] (+ Σ_p A2[m][p] B2[p][q])
//            (z = b + h Wᵀ with the transposed copy Wᵀ;  ∂ℓ/∂h = δ W)
//   transpose: out = inᵀ
//   (A2 = null: one product. The two-product forms are the R-operator's sums.)
//   colsum:  c[P]    = (acc ? c : 0) + Σ_m A[m][p]                           (∇b = Σ_n δ)
// group_sum: the sum of one value per group member, returned to every member, in a
// fixed order (deterministic).

// CPU (SerialGroup) ------------------------------------------------------------------------
#if !defined(__CUDACC__)
// Register-tiled kernel for the CPU: out[i][0..NV·n) (+)= Σ_r a[i·ai + r·ar] · b[r·bs + 0..NV·n)
// for i < MR, n = the vector width (8 floats / 4 doubles on AVX2). The MR × NV
// accumulators stay in vector registers for the whole reduction over r; each loaded
// row of b is reused MR times. GCC/Clang vector extensions (no intrinsics): the same
// source vectorises for whatever -march allows.
template <class S>
struct Vec {
  typedef S type __attribute__((vector_size(32)));
  static constexpr int n = int(32 / sizeof(S));
};
template <class S>
inline typename Vec<S>::type vload(const S* p) {
  typename Vec<S>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <class S>
inline void vstore(S* p, typename Vec<S>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// One product term for rc_gemm: element (i, r) of the left factor is a[i·ai + r·ar]; row
// r of the right factor starts at b + r·bs; r < R.
template <class S>
struct Term {
  int R;
  const S* a;
  int64_t ai, ar;
  const S* b;
  int64_t bs;
};

template <class S, int MR, int NV>
inline void tile(const Term<S>& x, const Term<S>& y, int64_t i0, int q0, S* out, int64_t ldo, bool acc,
                 const S* bias) {
  using v = typename Vec<S>::type;
  constexpr int n = Vec<S>::n;
  v c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j)
      c[i][j] = acc ? vload(out + (i0 + i) * ldo + q0 + j * n) : (bias ? vload(bias + q0 + j * n) : v{});
  for (int r = 0; r < x.R; ++r) {
    v bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = vload(x.b + r * x.bs + q0 + j * n);
    for (int i = 0; i < MR; ++i) {
      const S s = x.a[(i0 + i) * x.ai + r * x.ar];
      for (int j = 0; j < NV; ++j) c[i][j] += s * bv[j];
    }
  }
  for (int r = 0; r < y.R; ++r) {
    v bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = vload(y.b + r * y.bs + q0 + j * n);
    for (int i = 0; i < MR; ++i) {
      const S s = y.a[(i0 + i) * y.ai + r * y.ar];
      for (int j = 0; j < NV; ++j) c[i][j] += s * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) vstore(out + (i0 + i) * ldo + q0 + j * n, c[i][j]);
}

// out[i][q] += Σ_r x.a(i, r) x.b(r, q) for one ragged column q, vectorised over
// whichever of i or r is contiguous.
template <class S>
inline void ragged_column(int Mo, const Term<S>& x, int q, S* out, int64_t ldo) {
  if (x.R == 0) return;
  if (x.ai == 1 && ldo == 1) {  // e.g. ∇W of a 1-input layer: out[i] += Σ_r a[i + r·ar] b[r]
    for (int r = 0; r < x.R; ++r) {
      const S br = x.b[r * x.bs + q];
      const S* ar_ = x.a + r * x.ar;
#pragma omp simd
      for (int i = 0; i < Mo; ++i) out[i + q] += ar_[i] * br;
    }
  } else if (x.ar == 1 && x.bs == 1) {  // e.g. a 1-output layer: out[i] += Σ_r a[i·ai + r] b[r]
    // four rows at a time: four independent vector accumulators share each load of b
    using v = typename Vec<S>::type;
    constexpr int n = Vec<S>::n;
    int i0 = 0;
    for (; i0 + 4 <= Mo; i0 += 4) {
      const S* a0 = x.a + i0 * x.ai;
      const S* a1 = a0 + x.ai;
      const S* a2 = a1 + x.ai;
      const S* a3 = a2 + x.ai;
      v c0{}, c1{}, c2{}, c3{};
      int r = 0;
      for (; r + n <= x.R; r += n) {
        const v bb = vload(x.b + r + q);
        c0 += vload(a0 + r) * bb;
        c1 += vload(a1 + r) * bb;
        c2 += vload(a2 + r) * bb;
        c3 += vload(a3 + r) * bb;
      }
      S t0 = S(0), t1 = S(0), t2 = S(0), t3 = S(0);
      for (int k = 0; k < n; ++k) {
        t0 += c0[k];
        t1 += c1[k];
        t2 += c2[k];
        t3 += c3[k];
      }
      for (; r < x.R; ++r) {
        const S bb = x.b[r + q];
        t0 += a0[r] * bb;
        t1 += a1[r] * bb;
        t2 += a2[r] * bb;
        t3 += a3[r] * bb;
      }
      out[i0 * ldo + q] += t0;
      out[(i0 + 1) * ldo + q] += t1;
      out[(i0 + 2) * ldo + q] += t2;
      out[(i0 + 3) * ldo + q] += t3;
    }
    for (int i = i0; i < Mo; ++i) {
      const S* ai_ = x.a + i * x.ai;
      S t = S(0);
#pragma omp simd reduction(+ : t)
      for (int r = 0; r < x.R; ++r) t += ai_[r] * x.b[r + q];
      out[i * ldo + q] += t;
    }
  } else {
    for (int i = 0; i < Mo; ++i) {
      S t = S(0);
      for (int r = 0; r < x.R; ++r) t += x.a[i * x.ai + r * x.ar] * x.b[r * x.bs + q];
      out[i * ldo + q] += t;
    }
  }
}

// One column block of NV vectors at q, rows 0 <= i < Mo, in register tiles of at most
// 12 accumulators (MR·NV <= 12 of the 16 vector registers): ceil(Mo / MRmax) tiles with
// the rows spread evenly over them (10 rows: one 10 × 1 or two 5 × 2 tiles, not a 6-row
// and a 4-row one), so that every tile has as many independent FMA chains as the block
// allows (the FMA latency is hidden from ~8-10 chains on two pipes).
template <class S, int NV, int MR>
inline void row_tiles(int ntiles, int nbig, int i, const Term<S>& x, const Term<S>& y, int q, S* out, int64_t ldo,
                      bool acc, const S* bias) {
  // nbig tiles of MR rows, then ntiles − nbig tiles of MR − 1 rows
  for (int t = 0; t < nbig; ++t, i += MR) tile<S, MR, NV>(x, y, i, q, out, ldo, acc, bias);
  if constexpr (MR > 1)
    for (int t = nbig; t < ntiles; ++t, i += MR - 1) tile<S, MR - 1, NV>(x, y, i, q, out, ldo, acc, bias);
}

template <class S, int NV>
inline void col_block(int Mo, const Term<S>& x, const Term<S>& y, int q, S* out, int64_t ldo, bool acc,
                      const S* bias) {
  constexpr int kMaxRows = 12 / NV;
  if (Mo <= 0) return;
  const int ntiles = (Mo + kMaxRows - 1) / kMaxRows;
  const int rows = (Mo + ntiles - 1) / ntiles;   // the larger tile height, <= kMaxRows
  const int nbig = Mo - ntiles * (rows - 1);     // tiles of `rows` rows; the others have rows − 1
  switch (rows) {
#define FM_ROWS(R)                                                                   \
  case R:                                                                            \
    if constexpr (R <= kMaxRows) row_tiles<S, NV, R>(ntiles, nbig, 0, x, y, q, out, ldo, acc, bias); \
    break;
    FM_ROWS(1) FM_ROWS(2) FM_ROWS(3) FM_ROWS(4) FM_ROWS(5) FM_ROWS(6)
    FM_ROWS(7) FM_ROWS(8) FM_ROWS(9) FM_ROWS(10) FM_ROWS(11) FM_ROWS(12)
#undef FM_ROWS
    default: break;
  }
}

// out[i][q] = (acc ? out : bias ? bias[q] : 0) + Σ_r x.a(i, r) x.b(r, q) + Σ_r y.a(i, r) y.b(r, q)
// for i < Mo, q < Q (out row stride ldo): two products summed in one pass over the
// output. The full vectors of a row are split into column blocks of 2 vectors (one of
// 1 when their number is odd: a 40-wide float row is 2 + 2 + 1), each run by col_block;
// the < n ragged columns last, one by one. (Measured on Zen 3 for the sinusoid MLP:
// wider blocks with fewer rows per tile, or 1-vector blocks with up to 12 rows, were
// slower.)
template <class S>
inline void rc_gemm2(int Mo, int Q, const Term<S>& x, const Term<S>& y, S* out, int64_t ldo, bool acc,
                     const S* bias) {
  constexpr int n = Vec<S>::n;
  int q = 0;
  for (; q + 2 * n <= Q; q += 2 * n) col_block<S, 2>(Mo, x, y, q, out, ldo, acc, bias);
  if (q + n <= Q) {
    col_block<S, 1>(Mo, x, y, q, out, ldo, acc, bias);
    q += n;
  }
  for (; q < Q; ++q) {
    if (!acc)
      for (int i = 0; i < Mo; ++i) out[i * ldo + q] = bias ? bias[q] : S(0);
    ragged_column(Mo, x, q, out, ldo);
    ragged_column(Mo, y, q, out, ldo);
  }
}

// n × n in-register transposes (the unpack / shuffle / lane-permute network of AVX).
inline void transpose_block(const float* in, int64_t ldi, float* out, int64_t ldo) {
  using v = Vec<float>::type;
  v r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = vload(in + i * ldi);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    vstore(out + i * ldo, __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    vstore(out + (i + 4) * ldo, __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}
inline void transpose_block(const double* in, int64_t ldi, double* out, int64_t ldo) {
  using v = Vec<double>::type;
  const v r0 = vload(in), r1 = vload(in + ldi), r2 = vload(in + 2 * ldi), r3 = vload(in + 3 * ldi);
  const v t0 = __builtin_shufflevector(r0, r1, 0, 4, 2, 6), t1 = __builtin_shufflevector(r0, r1, 1, 5, 3, 7);
  const v t2 = __builtin_shufflevector(r2, r3, 0, 4, 2, 6), t3 = __builtin_shufflevector(r2, r3, 1, 5, 3, 7);
  vstore(out, __builtin_shufflevector(t0, t2, 0, 1, 4, 5));
  vstore(out + ldo, __builtin_shufflevector(t1, t3, 0, 1, 4, 5));
  vstore(out + 2 * ldo, __builtin_shufflevector(t0, t2, 2, 3, 6, 7));
  vstore(out + 3 * ldo, __builtin_shufflevector(t1, t3, 2, 3, 6, 7));
}

// out[c][r] = in[r][c] for an R × C matrix.
template <class S>
inline void transpose(SerialGroup, int R, int C, const S* in, S* out) {
  if (R == 1 || C == 1) {
    for (int i = 0; i < R * C; ++i) out[i] = in[i];
    return;
  }
  constexpr int n = Vec<S>::n;
  const int R8 = R - R % n, C8 = C - C % n;
  for (int r0 = 0; r0 < R8; r0 += n)
    for (int c0 = 0; c0 < C8; c0 += n) transpose_block(in + int64_t(r0) * C + c0, C, out + int64_t(c0) * R + r0, R);
  for (int r = 0; r < R; ++r)  // ragged edges
    for (int c = (r < R8 ? C8 : 0); c < C; ++c) out[int64_t(c) * R + r] = in[int64_t(r) * C + c];
}

template <class S>
inline void gemm_tn(SerialGroup, int M, int P, int Q, const S* A1, const S* B1, const S* A2, const S* B2, S* C) {
  const Term<S> x{M, A1, 1, P, B1, Q};
  const Term<S> y{A2 ? M : 0, A2, 1, P, B2, Q};
  rc_gemm2(P, Q, x, y, C, Q, false, static_cast<const S*>(nullptr));
}

template <class S>
inline void gemm_nn(SerialGroup, int M, int Q, int P1, const S* A1, const S* B1, int P2, const S* A2, const S* B2,
                    S* C, const S* bias) {
  const Term<S> x{P1, A1, P1, 1, B1, Q};
  const Term<S> y{A2 ? P2 : 0, A2, P2, 1, B2, Q};
  rc_gemm2(M, Q, x, y, C, Q, false, bias);
}

template <class S>
inline void colsum(SerialGroup, int M, int P, const S* A, S* c, bool acc) {
  // one vector accumulator per column block, kept in a register across the M rows
  // (accumulating in c itself, which the compiler cannot prove distinct from A, stores
  // and reloads it on every row)
  using v = typename Vec<S>::type;
  constexpr int n = Vec<S>::n;
  int p = 0;
  for (; p + n <= P; p += n) {
    v t = acc ? vload(c + p) : v{};
    for (int m = 0; m < M; ++m) t += vload(A + int64_t(m) * P + p);
    vstore(c + p, t);
  }
  for (; p < P; ++p) {
    S t = acc ? c[p] : S(0);
    for (int m = 0; m < M; ++m) t += A[int64_t(m) * P + p];
    c[p] = t;
  }
}

template <class S>
inline S group_sum(SerialGroup, S v, S*) {
  return v;
}
#endif  // !__CUDA_ARCH__

// GPU (CtaGroup) ---------------------------------------------------------------------------
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

// ---- the per-task algorithm (written once) ----------------------------------------------

// Forward pass over N points with stored activations, then the loss and D_L = ∂ℓ/∂z_L.
// y: [N, d_L] floats (mse) or [N] int64 labels (cross_entropy). Returns the loss.
template <class S, class G>
FM_ALGO S forward_loss(G g, const Shape& s, int N, const S* x, const void* y, const Params<const S>& th,
                       const Acts<S>& a, S* red) {
  const S* const kNull = nullptr;
  const int L = s.L;
  const S* h = x;
  for (int l = 0; l < L; ++l) {
    const int din = s.d[l], dout = s.d[l + 1];
    gemm_nn(g, N, dout, din, h, th.WT[l], 0, kNull, kNull, a.H[l], th.b[l]);  // z = b + h Wᵀ
    g.sync();
    if (l < L - 1) {
      S* H = a.H[l];
      for (int i = g.rank(); i < N * dout; i += g.size()) H[i] = act_fwd(s.act, H[i]);  // h = σ(z)
      g.sync();
    }
    h = a.H[l];
  }
  const int C = s.d[L];
  const S* z = a.H[L - 1];
  S* D = a.D[L - 1];
  S part = S(0);
  if (s.loss == kMse) {
    // ℓ = Σ (z − y)² / (N·C);  ∂ℓ/∂z = 2 (z − y) / (N·C)
    const S* yy = static_cast<const S*>(y);
    const S scale = S(1) / (S(N) * S(C));
    for (int i = g.rank(); i < N * C; i += g.size()) {
      const S diff = z[i] - yy[i];
      part += diff * diff;
      D[i] = S(2) * scale * diff;
    }
    part *= scale;
  } else {
    // ℓ = (1/N) Σ_n [logsumexp(z_n) − z_n[y_n]];  ∂ℓ/∂z_n = (softmax(z_n) − onehot(y_n)) / N
    const int64_t* yy = static_cast<const int64_t*>(y);
    const S invN = S(1) / S(N);
    for (int n = g.rank(); n < N; n += g.size()) {
      const S* zn = z + int64_t(n) * C;
      S* Dn = D + int64_t(n) * C;
      S m = zn[0];
      for (int c = 1; c < C; ++c) m = zn[c] > m ? zn[c] : m;
      S se = S(0);
      for (int c = 0; c < C; ++c) se += fm_exp(zn[c] - m);
      const S lse = m + fm_log(se);
      const int64_t lab = yy[n];
      part += lse - zn[lab];
      for (int c = 0; c < C; ++c) Dn[c] = (fm_exp(zn[c] - lse) - (c == lab ? S(1) : S(0))) * invN;
    }
    part *= invN;
  }
  const S loss = group_sum(g, part, red);
  g.sync();
  return loss;
}

// Backward pass from D_L (stored by forward_loss): fills D_l, E_l and the gradient.
template <class S, class G>
FM_ALGO void backward(G g, const Shape& s, int N, const S* x, const Params<const S>& th, const Acts<S>& a,
                      const Params<S>& grad) {
  const S* const kNull = nullptr;
  for (int l = s.L - 1; l >= 0; --l) {
    const int din = s.d[l], dout = s.d[l + 1];
    const S* hin = l == 0 ? x : a.H[l - 1];
    gemm_tn(g, N, dout, din, a.D[l], hin, kNull, kNull, grad.W[l]);  // ∇W_l = δ_lᵀ h_{l−1}
    colsum(g, N, dout, a.D[l], grad.b[l], false);            // ∇b_l = Σ_n δ_l
    if (l > 0) {
      gemm_nn(g, N, din, dout, a.D[l], th.W[l], 0, kNull, kNull, a.E[l - 1], kNull);  // e = ∂ℓ/∂h_{l−1} = δ_l W_l
      g.sync();
      const S* H = a.H[l - 1];
      const S* E = a.E[l - 1];
      S* D = a.D[l - 1];
      for (int i = g.rank(); i < N * din; i += g.size()) D[i] = act_d1(s.act, H[i]) * E[i];  // δ = σ'(z) e
    }
    g.sync();
  }
}

// Scratch of one HVP: RZ_l, RH_l, RD_l ([N, d_l] each) and RE ([N, maxd]).
FM_HD int64_t hvp_scratch_size(const Shape& s, int N) { return 3 * int64_t(N) * s.sum_d + int64_t(N) * s.maxd; }

// Hessian-vector product at θ by the R-operator (forward-over-reverse), given the stored
// activations of forward_loss + backward at θ and the tangent u = (RW, Rb). Writes hv.
template <class S, class G>
FM_ALGO void hvp(G g, const Shape& s, int N, const S* x, const Params<const S>& th, const Acts<S>& a,
                 const Params<const S>& u, const Params<S>& hv, S* scratch) {
  const S* const kNull = nullptr;
  const int L = s.L;
  S* RZ[kMaxLayers];
  S* RH[kMaxLayers];
  S* RD[kMaxLayers];
  S* base = scratch;
  for (int l = 0; l < L; ++l) {
    const int64_t n = int64_t(N) * s.d[l + 1];
    RZ[l] = base;
    RH[l] = base + n;
    RD[l] = base + 2 * n;
    base += 3 * n;
  }
  S* RE = base;
  // R-forward: R{z_l} = h_{l−1} R{W_l}ᵀ + R{h_{l−1}} W_lᵀ + R{b_l};  R{h_l} = σ'(z_l) R{z_l}
  for (int l = 0; l < L; ++l) {
    const int din = s.d[l], dout = s.d[l + 1];
    const S* hin = l == 0 ? x : a.H[l - 1];
    gemm_nn(g, N, dout, din, hin, u.WT[l], din, l > 0 ? RH[l - 1] : kNull, l > 0 ? th.WT[l] : kNull, RZ[l], u.b[l]);
    g.sync();
    if (l < L - 1) {
      const S* H = a.H[l];
      for (int i = g.rank(); i < N * dout; i += g.size()) RH[l][i] = act_d1(s.act, H[i]) * RZ[l][i];
      g.sync();
    }
  }
  // R{δ_L} = (∂²ℓ/∂z²) R{z_L}
  const int C = s.d[L];
  {
    const S* Rz = RZ[L - 1];
    S* Rd = RD[L - 1];
    if (s.loss == kMse) {
      const S c2 = S(2) / (S(N) * S(C));  // MSE: 2/(N·C) I
      for (int i = g.rank(); i < N * C; i += g.size()) Rd[i] = c2 * Rz[i];
    } else {
      // CE: (diag(p) − p pᵀ) R{z} / N per point, p = softmax(z) recomputed from z_L.
      const S* z = a.H[L - 1];
      const S invN = S(1) / S(N);
      for (int n = g.rank(); n < N; n += g.size()) {
        const S* zn = z + int64_t(n) * C;
        const S* rz = Rz + int64_t(n) * C;
        S* rd = Rd + int64_t(n) * C;
        S m = zn[0];
        for (int c = 1; c < C; ++c) m = zn[c] > m ? zn[c] : m;
        S se = S(0);
        for (int c = 0; c < C; ++c) se += fm_exp(zn[c] - m);
        const S inv = S(1) / se;
        S pr = S(0);
        for (int c = 0; c < C; ++c) pr += fm_exp(zn[c] - m) * inv * rz[c];
        for (int c = 0; c < C; ++c) rd[c] = fm_exp(zn[c] - m) * inv * (rz[c] - pr) * invN;
      }
    }
    g.sync();
  }
  // R-backward: R{∇W_l} = R{δ_l}ᵀ h_{l−1} + δ_lᵀ R{h_{l−1}};  R{∇b_l} = Σ_n R{δ_l}
  //   R{e} = R{δ_l} W_l + δ_l R{W_l};  R{δ_{l−1}} = σ'(z) R{e} + σ''(z) R{z} e
  for (int l = L - 1; l >= 0; --l) {
    const int din = s.d[l], dout = s.d[l + 1];
    const S* hin = l == 0 ? x : a.H[l - 1];
    gemm_tn(g, N, dout, din, RD[l], hin, l > 0 ? a.D[l] : kNull, l > 0 ? RH[l - 1] : kNull, hv.W[l]);
    colsum(g, N, dout, RD[l], hv.b[l], false);
    if (l > 0) {
      gemm_nn(g, N, din, dout, RD[l], th.W[l], dout, a.D[l], u.W[l], RE, kNull);
      g.sync();
      const S* H = a.H[l - 1];
      const S* E = a.E[l - 1];
      const S* Rz = RZ[l - 1];
      S* Rd = RD[l - 1];
      if (s.act == kRelu) {
        for (int i = g.rank(); i < N * din; i += g.size()) Rd[i] = act_d1(kRelu, H[i]) * RE[i];  // σ'' = 0
      } else {
        for (int i = g.rank(); i < N * din; i += g.size())
          Rd[i] = act_d1(s.act, H[i]) * RE[i] + act_d2(s.act, H[i]) * Rz[i] * E[i];
      }
    }
    g.sync();
  }
}

// ---- the MAML meta-step of one task -------------------------------------------------------

template <class S>
struct MamlArgs {
  Shape s;
  int K = 1;
  int Ns = 1, Nq = 1;
  Params<const S> th0;        // shared initial parameters (user tensors)
  const S* xs = nullptr;      // [T, Ns, d0]
  const void* ys = nullptr;   // [T, Ns, dL] or [T, Ns] int64
  const S* xq = nullptr;
  const void* yq = nullptr;
  int lr_mode = kLrScalar;
  const S* lr = nullptr;      // packed lr (see LrMode); null with kLrScalar: use lr_value
  S lr_value = S(0);
  const S* msl = nullptr;     // [K] query-loss weights w_k (applied to θ_{k+1})
  S inv_T = S(1);
  bool first_order = false;
  bool need_grad = true;
  int n_lr = 0;               // size of the packed lr gradient (0: lr not learned)
};

// The MamlArgs fields that the CPU and the CUDA launchers fill alike from the integers
// that cross the Python boundary (host code; th0 is set by each launcher, whose
// parameter layouts differ).
template <class S>
inline MamlArgs<S> make_maml_args(const Shape& s, int64_t T, int K, int Ns, int Nq, std::uintptr_t xs,
                                  std::uintptr_t ys, std::uintptr_t xq, std::uintptr_t yq, int lr_mode,
                                  std::uintptr_t lr, double lr_value, std::uintptr_t msl, bool first_order,
                                  bool need_grad, int64_t n_lr) {
  MamlArgs<S> a;
  a.s = s;
  a.K = K;
  a.Ns = Ns;
  a.Nq = Nq;
  a.xs = as_ptr<const S>(xs, "xs");
  a.ys = as_ptr<const void>(ys, "ys");
  a.xq = as_ptr<const S>(xq, "xq");
  a.yq = as_ptr<const void>(yq, "yq");
  a.lr_mode = lr_mode;
  a.lr = lr ? reinterpret_cast<const S*>(lr) : nullptr;
  require(lr_mode == kLrScalar || a.lr != nullptr, "lr pointer is null for a tensor learning rate");
  a.lr_value = S(lr_value);
  a.msl = as_ptr<const S>(msl, "msl_weights");
  a.inv_T = S(1) / S(T);
  a.first_order = first_order;
  a.need_grad = need_grad;
  a.n_lr = need_grad ? int(n_lr) : 0;
  return a;
}

// Per-task workspace, in S elements: θ_1..θ_K with transposed weights (PT each); the
// support gradients g_k (n_g = K slots when the lr is learned, as dα_k needs them in
// the adjoint, else 1 reused slot); the query gradients at the n_q steps with a nonzero
// MSL weight; K sets of support activations; one region shared by the query
// activations (forward phase) and the HVP scratch (adjoint phase); θ_0ᵀ (PT); v, u (PT)
// and hv.
FM_HD int64_t maml_workspace_size(const Shape& s, int K, int Ns, int Nq, int n_g, int n_q) {
  const int64_t qa = acts_size(s, Nq), hs = hvp_scratch_size(s, Ns);
  return int64_t(K) * s.PT + int64_t(n_g + n_q) * s.P + int64_t(K) * acts_size(s, Ns) + (qa > hs ? qa : hs) +
         2 * s.PT + 2 * s.P;
}

// Writes the transposed weights of a parameter set (its WT pointers) from its W.
template <class S, class G>
FM_ALGO void fill_transposes(G g, const Shape& s, const Params<const S>& src, S* const* WT) {
  for (int l = 0; l < s.L; ++l) transpose(g, s.d[l + 1], s.d[l], src.W[l], WT[l]);
  g.sync();
}

template <class S>
FM_HD S lr_at(const MamlArgs<S>& a, int k, int tensor, int64_t i) {
  switch (a.lr_mode) {
    case kLrTable: return a.lr[int64_t(k) * 2 * a.s.L + tensor];
    case kLrElem: return a.lr[i];
    case kLrStepElem: return a.lr[int64_t(k) * a.s.P + i];
    default: return a.lr ? a.lr[0] : a.lr_value;
  }
}

// Runs task t: K inner steps on its support set from the shared θ, the weighted query
// losses, and (need_grad) the adjoint recursion. Adds (1/T)·Σ_k w_k Lq to *loss_acc,
// the task's dM/dθ to dtheta_acc [P] and dM/dα to dlr_acc [n_lr] (accumulating: the
// caller sums tasks in a fixed order). ws: maml_workspace_size elements; red: the
// group_sum scratch (GPU: blockDim.x elements).
template <class S, class G>
FM_ALGO void maml_task(G g, const MamlArgs<S>& a, int64_t t, S* ws, S* red, S* loss_acc, S* dtheta_acc,
                       S* dlr_acc) {
  const Shape& s = a.s;
  const int K = a.K, L = s.L;
  const int64_t P = s.P;
  const int d0 = s.d[0], dL = s.d[L];
  const S* xs = a.xs + t * a.Ns * d0;
  const S* xq = a.xq + t * a.Nq * d0;
  const void* ys;
  const void* yq;
  if (s.loss == kMse) {
    ys = static_cast<const S*>(a.ys) + t * a.Ns * dL;
    yq = static_cast<const S*>(a.yq) + t * a.Nq * dL;
  } else {
    ys = static_cast<const int64_t*>(a.ys) + t * a.Ns;
    yq = static_cast<const int64_t*>(a.yq) + t * a.Nq;
  }
  const int64_t PT = s.PT;
  S* theta = ws;                 // θ_{k+1} (with its transposed weights) at theta + k·PT
  const int n_g = a.n_lr > 0 ? K : 1;
  int n_q = 0;
  for (int k = 0; k < K; ++k) n_q += a.msl[k] != S(0);
  S* gs = theta + K * PT;        // g_k at gs + (n_g == K ? k : 0)·P
  S* gq = gs + n_g * P;          // ∇Lq(θ_{k+1}) at gq + (#nonzero w_j, j < k)·P
  S* acts = gq + n_q * P;        // support activations at θ_k
  const int64_t as = acts_size(s, a.Ns);
  S* qacts = acts + K * as;      // query activations (forward phase) ...
  S* scratch = qacts;            // ... and the HVP scratch (adjoint phase) share a region
  const int64_t qa = acts_size(s, a.Nq), hs = hvp_scratch_size(s, a.Ns);
  S* th0t = qacts + (qa > hs ? qa : hs);  // θ_0's transposed weights (θ_0 itself: user tensors)
  S* v = th0t + PT;
  S* u = v + P;                  // PT: with transposed weights
  S* hvb = u + PT;
  auto g_slot = [&](int k) -> S* { return gs + (n_g == K ? k : 0) * P; };
  auto q_slot = [&](int k) -> S* {
    int j = 0;
    for (int i = 0; i < k; ++i) j += a.msl[i] != S(0);
    return gq + j * P;
  };

  Params<const S> th0 = a.th0;
  {
    const Params<S> t0 = flat_params(s, th0t, true);
    for (int l = 0; l < L; ++l) th0.WT[l] = t0.WT[l];
    fill_transposes(g, s, th0, t0.WT);
  }
  auto theta_k = [&](int k) -> Params<const S> {
    if (k == 0) return th0;
    return as_const(flat_params(s, theta + (k - 1) * PT, true));
  };
  // Elementwise loop over the flat parameter vector with the tensor index (for lr tables).
  // θ is not flat for k = 0 (user tensors), so every loop goes tensor by tensor.

  // ---- inner loop: θ_{k+1} = θ_k − α_k ⊙ ∇Ls(θ_k) -------------------------------------
  S meta = S(0);
  for (int k = 0; k < K; ++k) {
    const Params<const S> th = theta_k(k);
    const Acts<S> ak = carve_acts(s, a.Ns, acts + k * as);
    forward_loss(g, s, a.Ns, xs, ys, th, ak, red);
    const Params<S> gk = flat_params(s, g_slot(k));
    backward(g, s, a.Ns, xs, th, ak, gk);
    S* next = theta + k * PT;
    for (int l = 0; l < L; ++l) {
      const int64_t nw = int64_t(s.d[l + 1]) * s.d[l], nb = s.d[l + 1];
      const S* W = th.W[l];
      const S* B = th.b[l];
      const S* gW = gk.W[l];
      const S* gB = gk.b[l];
      S* nW = next + s.woff[l];
      S* nB = next + s.boff[l];
      if (a.lr_mode == kLrScalar || a.lr_mode == kLrTable) {
        const S aw = lr_at(a, k, 2 * l, 0), ab = lr_at(a, k, 2 * l + 1, 0);
        for (int64_t i = g.rank(); i < nw; i += g.size()) nW[i] = W[i] - aw * gW[i];
        for (int64_t i = g.rank(); i < nb; i += g.size()) nB[i] = B[i] - ab * gB[i];
      } else {
        const S* al = a.lr + (a.lr_mode == kLrStepElem ? int64_t(k) * P : 0);  // per element: [P] for step k
        const S* aW = al + s.woff[l];
        const S* aB = al + s.boff[l];
        for (int64_t i = g.rank(); i < nw; i += g.size()) nW[i] = W[i] - aW[i] * gW[i];
        for (int64_t i = g.rank(); i < nb; i += g.size()) nB[i] = B[i] - aB[i] * gB[i];
      }
    }
    g.sync();
    fill_transposes(g, s, theta_k(k + 1), flat_params(s, next, true).WT);
    const S w = a.msl[k];
    if (w != S(0)) {
      const Params<const S> th1 = theta_k(k + 1);
      const Acts<S> aq = carve_acts(s, a.Nq, qacts);
      const S lq = forward_loss(g, s, a.Nq, xq, yq, th1, aq, red);
      meta += w * lq;
      if (a.need_grad) backward(g, s, a.Nq, xq, th1, aq, flat_params(s, q_slot(k)));
    }
  }
  if (g.rank() == 0) *loss_acc += meta * a.inv_T;
  if (!a.need_grad) return;

  // ---- adjoint: v_K = (w_K/T)∇Lq(θ_K); v_k = v_{k+1} − H_k(α_k ⊙ v_{k+1}) (+ MSL) ------
  for (int64_t i = g.rank(); i < P; i += g.size()) v[i] = S(0);
  g.sync();
  for (int k = K - 1; k >= 0; --k) {
    const S w = a.msl[k] * a.inv_T;
    if (a.msl[k] != S(0)) {
      const S* gqk = q_slot(k);
      for (int64_t i = g.rank(); i < P; i += g.size()) v[i] += w * gqk[i];
      g.sync();
    }
    // dM/dα_k += −g_k ⊙ v_{k+1}, reduced to the lr's granularity
    const S* gk = g_slot(k);
    if (a.n_lr > 0) {
      if (a.lr_mode == kLrElem || a.lr_mode == kLrStepElem) {
        S* dl = dlr_acc + (a.lr_mode == kLrStepElem ? k * P : 0);
        for (int64_t i = g.rank(); i < P; i += g.size()) dl[i] -= gk[i] * v[i];
      } else {
        for (int j = 0; j < 2 * L; ++j) {
          const int l = j / 2;
          const int64_t off = (j % 2 == 0) ? s.woff[l] : s.boff[l];
          const int64_t n = (j % 2 == 0) ? int64_t(s.d[l + 1]) * s.d[l] : s.d[l + 1];
          S part = S(0);
          for (int64_t i = g.rank(); i < n; i += g.size()) part -= gk[off + i] * v[off + i];
          const S tot = group_sum(g, part, red);
          if (g.rank() == 0) dlr_acc[a.lr_mode == kLrTable ? k * 2 * L + j : 0] += tot;
        }
      }
      g.sync();
    }
    if (!a.first_order) {
      // u = α_k ⊙ v_{k+1}  (H symmetric: (I − diag(α)H)ᵀ v = v − H(α ⊙ v))
      if (a.lr_mode == kLrScalar || a.lr_mode == kLrTable) {
        // one rate per tensor: hoisted out of the element loops (which then vectorise)
        for (int l = 0; l < L; ++l) {
          const int64_t ow = s.woff[l], ob = s.boff[l];
          const int64_t nw = int64_t(s.d[l + 1]) * s.d[l], nb = s.d[l + 1];
          const S aw = lr_at(a, k, 2 * l, 0), ab = lr_at(a, k, 2 * l + 1, 0);
          for (int64_t i = g.rank(); i < nw; i += g.size()) u[ow + i] = aw * v[ow + i];
          for (int64_t i = g.rank(); i < nb; i += g.size()) u[ob + i] = ab * v[ob + i];
        }
      } else {
        const S* al = a.lr + (a.lr_mode == kLrStepElem ? int64_t(k) * P : 0);  // per element: [P] for step k
        for (int64_t i = g.rank(); i < P; i += g.size()) u[i] = al[i] * v[i];
      }
      g.sync();
      const Params<S> up = flat_params(s, u, true);
      const Params<const S> uc = as_const(up);
      fill_transposes(g, s, uc, up.WT);
      const Acts<S> ak = carve_acts(s, a.Ns, acts + k * as);
      hvp(g, s, a.Ns, xs, theta_k(k), ak, uc, flat_params(s, hvb), scratch);
      for (int64_t i = g.rank(); i < P; i += g.size()) v[i] -= hvb[i];
      g.sync();
    }
  }
  for (int64_t i = g.rank(); i < P; i += g.size()) dtheta_acc[i] += v[i];
  g.sync();
}

}  // namespace mlp
}  // namespace fastmaml
