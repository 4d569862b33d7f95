// BatchNorm in batch-statistics mode on CPU tensors: forward, backward and the closed-
// form double backward (the math: docs/DESIGN.md §1; its torch-ops twin:
// fastmaml/reference/batch_norm.py). C++17 + OpenMP.
//
// Two layouts (`layout`): 0, x a contiguous [N, C, L] (L = the product of the spatial
// sizes; channel c is N runs of L contiguous values), where a channel is one work item;
// 1, channels last: x a contiguous [N, L, C], i.e. M = N L rows of C values (a
// channels_last [N, C, H, W] tensor), where a block of kRowBlock rows is one work item
// (its per-channel partial sums, vectorised over the channels, are then added in block
// order). Either way the sums are taken in double, in an order fixed by the shape alone
// (so results do not depend on the thread count), and every per-element result is an
// affine function of the inputs with per-channel coefficients, written in one streaming
// pass. Each call is one reduction pass and one elementwise pass over its tensors (the
// forward's statistics: one shifted pass).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "batch_norm/batch_norm_api.h"

namespace fastmaml {

namespace {

template <class S>
struct BnTensors {
  int64_t N, C, L;
  const S* x;
  const S* w;
  const S* mean;
  const S* rstd;
};

// ---- per-channel coefficients (shared by both layouts) ---------------------------------
// The forward's from the shifted sums s1 = Σ (x − k), s2 = Σ (x − k)² over M values.
struct FwdCoef {
  double mu, r, scale, shift;
};
inline FwdCoef fwd_coef(double s1, double s2, double k, double M, double w, double b, double eps) {
  const double mu = k + s1 / M;
  const double var = std::max(0.0, s2 / M - (s1 / M) * (s1 / M));
  const double r = 1.0 / std::sqrt(var + eps);
  return {mu, r, w * r, b - mu * w * r};
}

// The backward's from sg = Σ gy, sgd = Σ gy (x − μ): dw, db and dx = kg gy + kx (x − μ) + k0.
struct BwdCoef {
  double dw, db, kg, kx, k0;
};
inline BwdCoef bwd_coef(double sg, double sgd, double r, double w, double M) {
  const double sgx = r * sgd;  // x̂ = (x − μ) r
  return {sgx, sg, w * r, -w * r * r * sgx / M, -w * r * sg / M};
}

// The double backward's from Σ gy, Σ gy (x − μ), Σ a, Σ a (x − μ), Σ a gy and the
// cotangents bw, bb of dw, db (see fastmaml/reference/batch_norm.py). Per element, with
// d = x − μ: g_gy = ya a + yd d + y0 and g_x = xa a + xg gy + xd d + x0.
struct BwdBwdCoef {
  double gw, ya, yd, y0, xa, xg, xd, x0;
};
inline BwdBwdCoef bwd_bwd_coef(double sg, double sgd, double A, double ad, double sag, double bwc, double bbc,
                               double r, double w, double M) {
  const double sgx = r * sgd, ax = r * ad;
  const double gw = r * (sag - sg * A / M - ax * sgx / M);
  const double q = bwc - w * r * ax / M;
  const double ca = -w * r * r * sgx / M;
  const double cg = r * q;
  const double cx = -(r / M) * w * gw + w * r * r * sgx * ax / (M * M) - r * q * sgx / M;
  const double c0 = w * r * r * sgx * A / (M * M) - r * q * sg / M;
  return {gw, w * r, q * r, bbc - w * r * A / M, ca, cg, cx * r, c0};
}

// ---- layout 0: [N, C, L], one channel per work item -------------------------------------
template <class S>
void bn_fwd(const S* x, const S* w, const S* b, S* y, S* mean, S* rstd, int64_t N, int64_t C, int64_t L, double eps,
            int threads) {
  const double M = static_cast<double>(N * L);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && C > 1)
  for (int64_t c = 0; c < C; ++c) {
    // One pass over the channel, shifted by its first value k (exact for a constant
    // channel, and no cancellation when the mean is far from 0): Σ (x − k), Σ (x − k)².
    const double k = x[c * L];
    double s1 = 0.0, s2 = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const S* xp = x + (n * C + c) * L;
      double a1 = 0.0, a2 = 0.0;
#pragma omp simd reduction(+ : a1, a2)
      for (int64_t l = 0; l < L; ++l) {
        const double d = static_cast<double>(xp[l]) - k;
        a1 += d;
        a2 += d * d;
      }
      s1 += a1;
      s2 += a2;
    }
    const FwdCoef f = fwd_coef(s1, s2, k, M, static_cast<double>(w[c]), static_cast<double>(b[c]), eps);
    mean[c] = static_cast<S>(f.mu);
    rstd[c] = static_cast<S>(f.r);
    const S scale = static_cast<S>(f.scale), shift = static_cast<S>(f.shift);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = (n * C + c) * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) y[base + l] = x[base + l] * scale + shift;
    }
  }
}

// f(c, r, w, μ) for every channel c (its rstd, weight and mean), the channels split over
// `threads` OpenMP threads.
template <class S, class F>
void for_each_channel(const BnTensors<S>& t, int threads, F f) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && t.C > 1)
  for (int64_t c = 0; c < t.C; ++c) f(c, static_cast<double>(t.rstd[c]), static_cast<double>(t.w[c]), t.mean[c]);
}

// Σ gy and Σ gy (x − μ) over channel c, in double (one pass).
template <class S>
void gy_sums(const BnTensors<S>& t, const S* gy, int64_t c, S muS, double* sg, double* sgd) {
  double a1 = 0.0, a2 = 0.0;
  for (int64_t n = 0; n < t.N; ++n) {
    const int64_t base = (n * t.C + c) * t.L;
    const S* gp = gy + base;
    const S* xp = t.x + base;
    double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t l = 0; l < t.L; ++l) {
      const double g = gp[l];
      s1 += g;
      s2 += g * static_cast<double>(xp[l] - muS);
    }
    a1 += s1;
    a2 += s2;
  }
  *sg = a1;
  *sgd = a2;
}

// dx = w r (gy − Σgy/M − x̂ Σ(gy x̂)/M), dw = Σ gy x̂, db = Σ gy. dx may be null.
template <class S>
void bn_bwd(const BnTensors<S>& t, const S* gy, S* dx, S* dw, S* db, int threads) {
  const int64_t N = t.N, C = t.C, L = t.L;
  const double M = static_cast<double>(N * L);
  for_each_channel(t, threads, [&](int64_t c, double r, double w, S muS) {
    double sg = 0.0, sgd = 0.0;
    gy_sums(t, gy, c, muS, &sg, &sgd);
    const BwdCoef k = bwd_coef(sg, sgd, r, w, M);
    dw[c] = static_cast<S>(k.dw);
    db[c] = static_cast<S>(k.db);
    if (dx == nullptr) return;
    const S kg = static_cast<S>(k.kg), kx = static_cast<S>(k.kx), k0 = static_cast<S>(k.k0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = (n * C + c) * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) dx[base + l] = kg * gy[base + l] + kx * (t.x[base + l] - muS) + k0;
    }
  });
}

// The double backward: cotangents a (for dx; may be null = 0), bw (for dw), bb (for db;
// null = 0) -> g_gy, g_x, g_w (see fastmaml/reference/batch_norm.py,
// batch_norm_double_backward). g_gy / g_x may be null.
template <class S>
void bn_bwd_bwd(const BnTensors<S>& t, const S* gy, const S* a, const S* bw, const S* bb, S* g_gy, S* g_x, S* g_w,
                int threads) {
  const int64_t N = t.N, C = t.C, L = t.L;
  const double M = static_cast<double>(N * L);
  for_each_channel(t, threads, [&](int64_t c, double r, double w, S muS) {
    const double bwc = bw ? static_cast<double>(bw[c]) : 0.0, bbc = bb ? static_cast<double>(bb[c]) : 0.0;
    // One pass: Σ gy, Σ gy (x − μ), and with a: Σ a, Σ a (x − μ), Σ a gy.
    double sg = 0.0, sgd = 0.0, A = 0.0, ad = 0.0, sag = 0.0;
    if (a == nullptr) {
      gy_sums(t, gy, c, muS, &sg, &sgd);
    } else {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t base = (n * C + c) * L;
        const S* gp = gy + base;
        const S* xp = t.x + base;
        const S* ap = a + base;
        double s1 = 0.0, s2 = 0.0, s3 = 0.0, s4 = 0.0, s5 = 0.0;
#pragma omp simd reduction(+ : s1, s2, s3, s4, s5)
        for (int64_t l = 0; l < L; ++l) {
          const double g = gp[l], av = ap[l], d = static_cast<double>(xp[l] - muS);
          s1 += g;
          s2 += g * d;
          s3 += av;
          s4 += av * d;
          s5 += av * g;
        }
        sg += s1;
        sgd += s2;
        A += s3;
        ad += s4;
        sag += s5;
      }
    }
    const BwdBwdCoef k = bwd_bwd_coef(sg, sgd, A, ad, sag, bwc, bbc, r, w, M);
    g_w[c] = static_cast<S>(k.gw);
    const S ya = static_cast<S>(k.ya), yd = static_cast<S>(k.yd), y0 = static_cast<S>(k.y0);
    const S xa = static_cast<S>(k.xa), xg = static_cast<S>(k.xg), xd = static_cast<S>(k.xd), x0 = static_cast<S>(k.x0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = (n * C + c) * L;
      const S* xp = t.x + base;
      const S* gp = gy + base;
      const S* ap = a != nullptr ? a + base : nullptr;
      if (g_gy != nullptr) {
        S* o = g_gy + base;
        if (ap != nullptr) {
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[l] = ya * ap[l] + yd * (xp[l] - muS) + y0;
        } else {
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[l] = yd * (xp[l] - muS) + y0;
        }
      }
      if (g_x != nullptr) {
        S* o = g_x + base;
        if (ap != nullptr) {
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[l] = xa * ap[l] + xg * gp[l] + xd * (xp[l] - muS) + x0;
        } else {
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[l] = xg * gp[l] + xd * (xp[l] - muS) + x0;
        }
      }
    }
  });
}

// ---- layout 1: channels last, M rows of C values, blocks of rows per work item -----------
constexpr int64_t kRowBlock = 64;

inline int64_t row_blocks(int64_t M) { return (M + kRowBlock - 1) / kRowBlock; }

// Per-channel sums over all M rows: sums(r0, r1, acc) adds rows [r0, r1) into acc[j C + c]
// (j < nsum); the blocks' partial sums are added in block order, so the result depends
// on the shape only. Returns the nsum x C sums.
template <class F>
std::vector<double> row_sums(int64_t M, int64_t C, int nsum, int threads, F sums) {
  const int64_t nb = row_blocks(M), width = nsum * C;
  std::vector<double> part(static_cast<size_t>(nb * width), 0.0);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nb > 1)
  for (int64_t bi = 0; bi < nb; ++bi) sums(bi * kRowBlock, std::min(M, (bi + 1) * kRowBlock), part.data() + bi * width);
  std::vector<double> out(static_cast<size_t>(width), 0.0);
  for (int64_t bi = 0; bi < nb; ++bi) {
    const double* p = part.data() + bi * width;
    for (int64_t j = 0; j < width; ++j) out[j] += p[j];
  }
  return out;
}

// f(r0, r1) over the row blocks, split over `threads` OpenMP threads (the elementwise pass).
template <class F>
void for_each_row_block(int64_t M, int threads, F f) {
  const int64_t nb = row_blocks(M);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nb > 1)
  for (int64_t bi = 0; bi < nb; ++bi) f(bi * kRowBlock, std::min(M, (bi + 1) * kRowBlock));
}

template <class S>
std::vector<S> to_s(const std::vector<double>& v) {
  return std::vector<S>(v.begin(), v.end());
}

template <class S>
void bn_fwd_rows(const S* x, const S* w, const S* b, S* y, S* mean, S* rstd, int64_t M, int64_t C, double eps,
                 int threads) {
  std::vector<double> k(x, x + C);  // the shift: each channel's first value (row 0)
  const double* kp = k.data();
  const std::vector<double> s = row_sums(M, C, 2, threads, [&](int64_t r0, int64_t r1, double* acc) {
    for (int64_t m = r0; m < r1; ++m) {
      const S* xr = x + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(xr[c]) - kp[c];
        acc[c] += d;
        acc[C + c] += d * d;
      }
    }
  });
  std::vector<S> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    const FwdCoef f = fwd_coef(s[c], s[C + c], k[c], static_cast<double>(M), static_cast<double>(w[c]),
                               static_cast<double>(b[c]), eps);
    mean[c] = static_cast<S>(f.mu);
    rstd[c] = static_cast<S>(f.r);
    scale[c] = static_cast<S>(f.scale);
    shift[c] = static_cast<S>(f.shift);
  }
  const S *sc = scale.data(), *sh = shift.data();
  for_each_row_block(M, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) y[m * C + c] = x[m * C + c] * sc[c] + sh[c];
    }
  });
}

// Σ gy and Σ gy (x − μ) per channel over the rows (nsum = 2), or with a also Σ a,
// Σ a (x − μ), Σ a gy (nsum = 5).
template <class S>
std::vector<double> gy_row_sums(const BnTensors<S>& t, int64_t M, const S* gy, const S* a, int threads) {
  const int64_t C = t.C;
  const S* mu = t.mean;
  return row_sums(M, C, a == nullptr ? 2 : 5, threads, [&](int64_t r0, int64_t r1, double* acc) {
    for (int64_t m = r0; m < r1; ++m) {
      const S* xr = t.x + m * C;
      const S* gr = gy + m * C;
      if (a == nullptr) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double g = gr[c];
          acc[c] += g;
          acc[C + c] += g * static_cast<double>(xr[c] - mu[c]);
        }
      } else {
        const S* ar = a + m * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double g = gr[c], av = ar[c], d = static_cast<double>(xr[c] - mu[c]);
          acc[c] += g;
          acc[C + c] += g * d;
          acc[2 * C + c] += av;
          acc[3 * C + c] += av * d;
          acc[4 * C + c] += av * g;
        }
      }
    }
  });
}

template <class S>
void bn_bwd_rows(const BnTensors<S>& t, int64_t M, const S* gy, S* dx, S* dw, S* db, int threads) {
  const int64_t C = t.C;
  const std::vector<double> s = gy_row_sums(t, M, gy, static_cast<const S*>(nullptr), threads);
  std::vector<double> kg(C), kx(C), k0(C);
  for (int64_t c = 0; c < C; ++c) {
    const BwdCoef k = bwd_coef(s[c], s[C + c], static_cast<double>(t.rstd[c]), static_cast<double>(t.w[c]),
                               static_cast<double>(M));
    dw[c] = static_cast<S>(k.dw);
    db[c] = static_cast<S>(k.db);
    kg[c] = k.kg;
    kx[c] = k.kx;
    k0[c] = k.k0;
  }
  if (dx == nullptr) return;
  const std::vector<S> g = to_s<S>(kg), xk = to_s<S>(kx), z = to_s<S>(k0);
  const S *gp = g.data(), *xp = xk.data(), *zp = z.data(), *mu = t.mean;
  for_each_row_block(M, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      const int64_t base = m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dx[base + c] = gp[c] * gy[base + c] + xp[c] * (t.x[base + c] - mu[c]) + zp[c];
    }
  });
}

template <class S>
void bn_bwd_bwd_rows(const BnTensors<S>& t, int64_t M, const S* gy, const S* a, const S* bw, const S* bb, S* g_gy,
                     S* g_x, S* g_w, int threads) {
  const int64_t C = t.C;
  const std::vector<double> s = gy_row_sums(t, M, gy, a, threads);
  std::vector<double> coef(7 * C);  // ya, yd, y0, xa, xg, xd, x0 (one block of C each)
  for (int64_t c = 0; c < C; ++c) {
    const bool has_a = a != nullptr;
    const BwdBwdCoef k = bwd_bwd_coef(s[c], s[C + c], has_a ? s[2 * C + c] : 0.0, has_a ? s[3 * C + c] : 0.0,
                                      has_a ? s[4 * C + c] : 0.0, bw ? static_cast<double>(bw[c]) : 0.0,
                                      bb ? static_cast<double>(bb[c]) : 0.0, static_cast<double>(t.rstd[c]),
                                      static_cast<double>(t.w[c]), static_cast<double>(M));
    g_w[c] = static_cast<S>(k.gw);
    const double v[7] = {k.ya, k.yd, k.y0, k.xa, k.xg, k.xd, k.x0};
    for (int j = 0; j < 7; ++j) coef[j * C + c] = v[j];
  }
  const std::vector<S> cs = to_s<S>(coef);
  const S *ya = cs.data(), *yd = ya + C, *y0 = yd + C, *xa = y0 + C, *xg = xa + C, *xd = xg + C, *x0 = xd + C;
  const S* mu = t.mean;
  for_each_row_block(M, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      const int64_t base = m * C;
      const S* xr = t.x + base;
      const S* gr = gy + base;
      const S* ar = a != nullptr ? a + base : nullptr;
      if (g_gy != nullptr) {
        S* o = g_gy + base;
        if (ar != nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = ya[c] * ar[c] + yd[c] * (xr[c] - mu[c]) + y0[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = yd[c] * (xr[c] - mu[c]) + y0[c];
        }
      }
      if (g_x != nullptr) {
        S* o = g_x + base;
        if (ar != nullptr) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = xa[c] * ar[c] + xg[c] * gr[c] + xd[c] * (xr[c] - mu[c]) + x0[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = xg[c] * gr[c] + xd[c] * (xr[c] - mu[c]) + x0[c];
        }
      }
    }
  });
}

template <class S>
const S* cp(std::uintptr_t p) {
  return reinterpret_cast<const S*>(p);
}
template <class S>
S* mp(std::uintptr_t p) {
  return reinterpret_cast<S*>(p);
}


// The kernels of one dtype (S) and layout, on the raw pointers of the entry points.
template <class S>
void fwd_any(int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w, std::uintptr_t b,
             std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd, double eps, int threads) {
  if (layout == 1)
    bn_fwd_rows<S>(cp<S>(x), cp<S>(w), cp<S>(b), mp<S>(y), mp<S>(mean), mp<S>(rstd), N * L, C, eps, threads);
  else
    bn_fwd<S>(cp<S>(x), cp<S>(w), cp<S>(b), mp<S>(y), mp<S>(mean), mp<S>(rstd), N, C, L, eps, threads);
}

template <class S>
void bwd_any(int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w, std::uintptr_t mean,
             std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t dx, std::uintptr_t dw, std::uintptr_t db,
             int threads) {
  const BnTensors<S> t{N, C, L, cp<S>(x), cp<S>(w), cp<S>(mean), cp<S>(rstd)};
  if (layout == 1)
    bn_bwd_rows<S>(t, N * L, cp<S>(gy), mp<S>(dx), mp<S>(dw), mp<S>(db), threads);
  else
    bn_bwd<S>(t, cp<S>(gy), mp<S>(dx), mp<S>(dw), mp<S>(db), threads);
}

template <class S>
void bwd_bwd_any(int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                 std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t a, std::uintptr_t bw,
                 std::uintptr_t bb, std::uintptr_t g_gy, std::uintptr_t g_x, std::uintptr_t g_w, int threads) {
  const BnTensors<S> t{N, C, L, cp<S>(x), cp<S>(w), cp<S>(mean), cp<S>(rstd)};
  if (layout == 1)
    bn_bwd_bwd_rows<S>(t, N * L, cp<S>(gy), cp<S>(a), cp<S>(bw), cp<S>(bb), mp<S>(g_gy), mp<S>(g_x), mp<S>(g_w),
                       threads);
  else
    bn_bwd_bwd<S>(t, cp<S>(gy), cp<S>(a), cp<S>(bw), cp<S>(bb), mp<S>(g_gy), mp<S>(g_x), mp<S>(g_w), threads);
}

}  // namespace

void batch_norm_fwd_cpu(int dtype, int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                        std::uintptr_t b, std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd, double eps,
                        int threads) {
  if (dtype == 0)
    fwd_any<float>(layout, N, C, L, x, w, b, y, mean, rstd, eps, threads);
  else
    fwd_any<double>(layout, N, C, L, x, w, b, y, mean, rstd, eps, threads);
}

void batch_norm_bwd_cpu(int dtype, int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                        std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t dx,
                        std::uintptr_t dw, std::uintptr_t db, int threads) {
  if (dtype == 0)
    bwd_any<float>(layout, N, C, L, x, w, mean, rstd, gy, dx, dw, db, threads);
  else
    bwd_any<double>(layout, N, C, L, x, w, mean, rstd, gy, dx, dw, db, threads);
}

void batch_norm_bwd_bwd_cpu(int dtype, int layout, int64_t N, int64_t C, int64_t L, std::uintptr_t x,
                            std::uintptr_t w, std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy,
                            std::uintptr_t a, std::uintptr_t bw, std::uintptr_t bb, std::uintptr_t g_gy,
                            std::uintptr_t g_x, std::uintptr_t g_w, int threads) {
  if (dtype == 0)
    bwd_bwd_any<float>(layout, N, C, L, x, w, mean, rstd, gy, a, bw, bb, g_gy, g_x, g_w, threads);
  else
    bwd_bwd_any<double>(layout, N, C, L, x, w, mean, rstd, gy, a, bw, bb, g_gy, g_x, g_w, threads);
}

}  // namespace fastmaml
