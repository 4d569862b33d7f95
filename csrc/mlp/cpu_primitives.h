// mlp: the dense primitives specialised for the CPU policy (SerialGroup): contiguous,
// register-blocked inner loops the compiler vectorises. The interface (shared with
// mlp/gpu_primitives.cuh):
// All matrices are contiguous row-major with no padding.
//   gemm_tn: C[P][Q] = Σ_m A1[m][p] B1[m][q] (+ Σ_m A2[m][p] B2[m][q])         (∇W = δᵀ h)
//   gemm_nn: C[M][Q] = bias[q] + Σ_p A1[m][p] B1[p][q] (+ Σ_p A2[m][p] B2[p][q])
//            (z = b + h Wᵀ with the transposed copy Wᵀ;  ∂ℓ/∂h = δ W)
//   transpose: out = inᵀ
//   (A2 = null: one product. The two-product forms are the R-operator's sums.)
//   colsum:  c[P]    = (acc ? c : 0) + Σ_m A[m][p]                           (∇b = Σ_n δ)
// group_sum: the sum of one value per group member, returned to every member, in a
// fixed order (deterministic).

#pragma once

#include "mlp/layout.h"

namespace fastmaml {
namespace mlp {

#if !defined(__CUDACC__) && !defined(FM_CUDA_EMULATED_TU)
// Register-tiled kernel for the CPU: out[i][0..NV·n) (+)= Σ_r a[i·ai + r·ar] · b[r·bs + 0..NV·n)
// for i < MR, n = the vector width (8 floats / 4 doubles on AVX2). The MR × NV
// accumulators stay in vector registers for the whole reduction over r; each loaded
// row of b is reused MR times. GCC/Clang vector extensions (no intrinsics): the same
// source vectorises for whatever -march allows.
//
// The vector width: 64 bytes (16 floats / 8 doubles) where the target has AVX-512, else 32.
// The register tiles use the wide vectors (AVX-512 has 32 vector registers: up to 24
// accumulators per tile instead of 12), with one 32-byte block for a leftover half
// vector of columns (a 40-wide float row: 32 + 8); the transposes and the ragged
// reductions keep 32-byte vectors. A column's sum runs over r in the same order for any
// width, so the results do not depend on it.
#if defined(__AVX512F__)
#define FM_VEC_BYTES 64
#else
#define FM_VEC_BYTES 32
#endif
template <class S, int B = FM_VEC_BYTES>
struct Vec {
  typedef S type __attribute__((vector_size(B)));
  static constexpr int n = int(B / sizeof(S));
};
template <class S, int B = FM_VEC_BYTES>
inline typename Vec<S, B>::type vload(const S* p) {
  typename Vec<S, B>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <class S, int B = FM_VEC_BYTES>
inline void vstore(S* p, typename Vec<S, B>::type v) {
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

template <class S, int MR, int NV, int B>
inline void tile(const Term<S>& x, const Term<S>& y, int64_t i0, int q0, S* out, int64_t ldo, bool acc,
                 const S* bias, const S* init) {
  using v = typename Vec<S, B>::type;
  constexpr int n = Vec<S, B>::n;
  v c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j)
      c[i][j] = acc ? vload<S, B>(out + (i0 + i) * ldo + q0 + j * n)
                    : (bias ? vload<S, B>(bias + q0 + j * n) : v{});
  for (int r = 0; r < x.R; ++r) {
    v bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = vload<S, B>(x.b + r * x.bs + q0 + j * n);
    for (int i = 0; i < MR; ++i) {
      const S s = x.a[(i0 + i) * x.ai + r * x.ar];
      for (int j = 0; j < NV; ++j) c[i][j] += s * bv[j];
    }
  }
  for (int r = 0; r < y.R; ++r) {
    v bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = vload<S, B>(y.b + r * y.bs + q0 + j * n);
    for (int i = 0; i < MR; ++i) {
      const S s = y.a[(i0 + i) * y.ai + r * y.ar];
      for (int j = 0; j < NV; ++j) c[i][j] += s * bv[j];
    }
  }
  if (init) {  // out = init + the product, rounded once (as θ − α·g would be)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NV; ++j)
        vstore<S, B>(out + (i0 + i) * ldo + q0 + j * n, vload<S, B>(init + (i0 + i) * ldo + q0 + j * n) + c[i][j]);
    return;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) vstore<S, B>(out + (i0 + i) * ldo + q0 + j * n, c[i][j]);
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
    using v = typename Vec<S, 32>::type;
    constexpr int n = Vec<S, 32>::n;
    int i0 = 0;
    for (; i0 + 4 <= Mo; i0 += 4) {
      const S* a0 = x.a + i0 * x.ai;
      const S* a1 = a0 + x.ai;
      const S* a2 = a1 + x.ai;
      const S* a3 = a2 + x.ai;
      v c0{}, c1{}, c2{}, c3{};
      int r = 0;
      for (; r + n <= x.R; r += n) {
        const v bb = vload<S, 32>(x.b + r + q);
        c0 += vload<S, 32>(a0 + r) * bb;
        c1 += vload<S, 32>(a1 + r) * bb;
        c2 += vload<S, 32>(a2 + r) * bb;
        c3 += vload<S, 32>(a3 + r) * bb;
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
// 12 accumulators (MR·NV <= 12 of the 16 vector registers; 24 of AVX-512's 32 for 64-byte
// vectors): ceil(Mo / MRmax) tiles with
// the rows spread evenly over them (10 rows: one 10 × 1 or two 5 × 2 tiles, not a 6-row
// and a 4-row one), so that every tile has as many independent FMA chains as the block
// allows (the FMA latency is hidden from ~8-10 chains on two pipes).
template <class S, int NV, int B, int MR>
inline void row_tiles(int ntiles, int nbig, int i, const Term<S>& x, const Term<S>& y, int q, S* out, int64_t ldo,
                      bool acc, const S* bias, const S* init) {
  // nbig tiles of MR rows, then ntiles − nbig tiles of MR − 1 rows
  for (int t = 0; t < nbig; ++t, i += MR) tile<S, MR, NV, B>(x, y, i, q, out, ldo, acc, bias, init);
  if constexpr (MR > 1)
    for (int t = nbig; t < ntiles; ++t, i += MR - 1) tile<S, MR - 1, NV, B>(x, y, i, q, out, ldo, acc, bias, init);
}

template <class S, int NV, int B = FM_VEC_BYTES>
inline void col_block(int Mo, const Term<S>& x, const Term<S>& y, int q, S* out, int64_t ldo, bool acc,
                      const S* bias, const S* init) {
  constexpr int kMaxRows = (B == 64 ? 24 : 12) / NV;
  if (Mo <= 0) return;
  const int ntiles = (Mo + kMaxRows - 1) / kMaxRows;
  const int rows = (Mo + ntiles - 1) / ntiles;   // the larger tile height, <= kMaxRows
  const int nbig = Mo - ntiles * (rows - 1);     // tiles of `rows` rows; the others have rows − 1
  switch (rows) {
#define FM_ROWS(R)                                                                   \
  case R:                                                                            \
    if constexpr (R <= kMaxRows) row_tiles<S, NV, B, R>(ntiles, nbig, 0, x, y, q, out, ldo, acc, bias, init); \
    break;
    FM_ROWS(1) FM_ROWS(2) FM_ROWS(3) FM_ROWS(4) FM_ROWS(5) FM_ROWS(6)
    FM_ROWS(7) FM_ROWS(8) FM_ROWS(9) FM_ROWS(10) FM_ROWS(11) FM_ROWS(12)
    FM_ROWS(13) FM_ROWS(14) FM_ROWS(15) FM_ROWS(16) FM_ROWS(17) FM_ROWS(18)
    FM_ROWS(19) FM_ROWS(20) FM_ROWS(21) FM_ROWS(22) FM_ROWS(23) FM_ROWS(24)
#undef FM_ROWS
    default: break;
  }
}

// out[i][q] = (acc ? out : bias ? bias[q] : 0) + Σ_r x.a(i, r) x.b(r, q) + Σ_r y.a(i, r) y.b(r, q),
// or with init: init[i][q] + (Σ_r x.a(i, r) x.b(r, q) + Σ_r y.a(i, r) y.b(r, q)), the sum rounded first
// for i < Mo, q < Q (out and init row stride ldo): two products summed in one pass over the
// output. The full vectors of a row are split into column blocks of 2 vectors (one of
// 1 when their number is odd: a 40-wide float row is 2 + 2 + 1), each run by col_block;
// the < n ragged columns last, one by one (the fastest blocking for the sinusoid MLP:
// benchmarks/RESULTS.md, section "csrc/mlp/cpu_primitives.h").
template <class S>
inline void rc_gemm2(int Mo, int Q, const Term<S>& x, const Term<S>& y, S* out, int64_t ldo, bool acc,
                     const S* bias, const S* init = nullptr) {
  constexpr int n = Vec<S>::n;
  int q = 0;
  for (; q + 2 * n <= Q; q += 2 * n) col_block<S, 2>(Mo, x, y, q, out, ldo, acc, bias, init);
  if (q + n <= Q) {
    col_block<S, 1>(Mo, x, y, q, out, ldo, acc, bias, init);
    q += n;
  }
  if constexpr (FM_VEC_BYTES == 64) {  // a leftover half vector of columns: one 32-byte block
    if (q + Vec<S, 32>::n <= Q) {
      col_block<S, 1, 32>(Mo, x, y, q, out, ldo, acc, bias, init);
      q += Vec<S, 32>::n;
    }
  }
  for (; q < Q; ++q) {
    if (init)  // the product first, init added after it
      for (int i = 0; i < Mo; ++i) out[i * ldo + q] = S(0);
    else if (!acc)
      for (int i = 0; i < Mo; ++i) out[i * ldo + q] = bias ? bias[q] : S(0);
    ragged_column(Mo, x, q, out, ldo);
    ragged_column(Mo, y, q, out, ldo);
    if (init)
      for (int i = 0; i < Mo; ++i) out[i * ldo + q] = init[i * ldo + q] + out[i * ldo + q];
  }
}

// n × n in-register transposes (the unpack / shuffle / lane-permute network of AVX).
inline void transpose_block(const float* in, int64_t ldi, float* out, int64_t ldo) {
  using v = Vec<float, 32>::type;
  v r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = vload<float, 32>(in + i * ldi);
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
    vstore<float, 32>(out + i * ldo, __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    vstore<float, 32>(out + (i + 4) * ldo, __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}
inline void transpose_block(const double* in, int64_t ldi, double* out, int64_t ldo) {
  using v = Vec<double, 32>::type;
  const v r0 = vload<double, 32>(in), r1 = vload<double, 32>(in + ldi);
  const v r2 = vload<double, 32>(in + 2 * ldi), r3 = vload<double, 32>(in + 3 * ldi);
  const v t0 = __builtin_shufflevector(r0, r1, 0, 4, 2, 6), t1 = __builtin_shufflevector(r0, r1, 1, 5, 3, 7);
  const v t2 = __builtin_shufflevector(r2, r3, 0, 4, 2, 6), t3 = __builtin_shufflevector(r2, r3, 1, 5, 3, 7);
  vstore<double, 32>(out, __builtin_shufflevector(t0, t2, 0, 1, 4, 5));
  vstore<double, 32>(out + ldo, __builtin_shufflevector(t1, t3, 0, 1, 4, 5));
  vstore<double, 32>(out + 2 * ldo, __builtin_shufflevector(t0, t2, 2, 3, 6, 7));
  vstore<double, 32>(out + 3 * ldo, __builtin_shufflevector(t1, t3, 2, 3, 6, 7));
}

// out[c][r] = in[r][c] for an R × C matrix.
template <class S>
inline void transpose(SerialGroup, int R, int C, const S* in, S* out) {
  if (R == 1 || C == 1) {
    for (int i = 0; i < R * C; ++i) out[i] = in[i];
    return;
  }
  constexpr int n = Vec<S, 32>::n;
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

// C[P][Q] = Init[P][Q] + Σ_m A[m][p] B[m][q]: an SGD step fused into the gradient's
// product (A = −α δ, B = h: θ' = θ − α δᵀh without writing the gradient out).
template <class S>
inline void gemm_tn_init(SerialGroup, int M, int P, int Q, const S* A, const S* B, const S* Init, S* C) {
  const Term<S> x{M, A, 1, P, B, Q};
  const Term<S> y{0, nullptr, 1, P, nullptr, Q};
  rc_gemm2(P, Q, x, y, C, Q, false, static_cast<const S*>(nullptr), Init);
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

}  // namespace mlp
}  // namespace fastmaml
