// BatchNorm in batch-statistics mode on CPU tensors: forward, backward and the closed-
// form double backward (the math is in fastmaml/batch_norm.py). C++17 + OpenMP.
//
// Layout: x is a contiguous [N, C, L] (L = the product of the spatial sizes); channel c
// is N runs of L contiguous values. A channel is one work item: its sums are taken in
// double, in a fixed order (so results do not depend on the thread count), and every
// per-element result is an affine function of the inputs with per-channel
// coefficients, written in one streaming pass. Each call is one reduction pass and one
// elementwise pass over its tensors (the forward's statistics: one shifted pass).
#include <algorithm>
#include <cmath>
#include <cstdint>

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
    const double mu = k + s1 / M;
    const double var = std::max(0.0, s2 / M - (s1 / M) * (s1 / M));
    const double r = 1.0 / std::sqrt(var + eps);
    mean[c] = static_cast<S>(mu);
    rstd[c] = static_cast<S>(r);
    const S scale = static_cast<S>(static_cast<double>(w[c]) * r);
    const S shift = static_cast<S>(static_cast<double>(b[c]) - mu * static_cast<double>(w[c]) * r);
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
    const double sgx = r * sgd;  // x̂ = (x − μ) r
    dw[c] = static_cast<S>(sgx);
    db[c] = static_cast<S>(sg);
    if (dx == nullptr) return;
    // dx = k_g gy + k_x (x − μ) + k_0
    const S kg = static_cast<S>(w * r);
    const S kx = static_cast<S>(-w * r * r * sgx / M);
    const S k0 = static_cast<S>(-w * r * sg / M);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = (n * C + c) * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) dx[base + l] = kg * gy[base + l] + kx * (t.x[base + l] - muS) + k0;
    }
  });
}

// The double backward: cotangents a (for dx; may be null = 0), bw (for dw), bb (for db;
// null = 0) -> g_gy, g_x, g_w (see fastmaml/batch_norm.py). g_gy / g_x may be null.
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
    const double sgx = r * sgd, ax = r * ad;
    const double gw = r * (sag - sg * A / M - ax * sgx / M);
    g_w[c] = static_cast<S>(gw);
    // Per element, with d = x − μ (x̂ = d r):
    //   g_gy = w r a + (bw − w r ax/M) r d + (bb − w r A/M)
    //   g_x  = c_a a + c_g gy + c_x r d + c_0
    const double q = bwc - w * r * ax / M;
    const double ca = -w * r * r * sgx / M;
    const double cg = r * q;
    const double cx = -(r / M) * w * gw + w * r * r * sgx * ax / (M * M) - r * q * sgx / M;
    const double c0 = w * r * r * sgx * A / (M * M) - r * q * sg / M;
    const S ya = static_cast<S>(w * r), yd = static_cast<S>(q * r), y0 = static_cast<S>(bbc - w * r * A / M);
    const S xa = static_cast<S>(ca), xg = static_cast<S>(cg), xd = static_cast<S>(cx * r), x0 = static_cast<S>(c0);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t base = (n * C + c) * L;
      const S* xp = t.x + base;
      const S* gp = gy + base;
      if (a != nullptr) {
        const S* ap = a + base;
        if (g_gy != nullptr) {
          S* o = g_gy + base;
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[l] = ya * ap[l] + yd * (xp[l] - muS) + y0;
        }
        if (g_x != nullptr) {
          S* o = g_x + base;
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[l] = xa * ap[l] + xg * gp[l] + xd * (xp[l] - muS) + x0;
        }
      } else {
        if (g_gy != nullptr) {
          S* o = g_gy + base;
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[l] = yd * (xp[l] - muS) + y0;
        }
        if (g_x != nullptr) {
          S* o = g_x + base;
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) o[l] = xg * gp[l] + xd * (xp[l] - muS) + x0;
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

}  // namespace

void batch_norm_fwd_cpu(int dtype, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                        std::uintptr_t b, std::uintptr_t y, std::uintptr_t mean, std::uintptr_t rstd, double eps,
                        int threads) {
  if (dtype == 0)
    bn_fwd<float>(cp<float>(x), cp<float>(w), cp<float>(b), mp<float>(y), mp<float>(mean), mp<float>(rstd), N, C,
                  L, eps, threads);
  else
    bn_fwd<double>(cp<double>(x), cp<double>(w), cp<double>(b), mp<double>(y), mp<double>(mean), mp<double>(rstd),
                   N, C, L, eps, threads);
}

void batch_norm_bwd_cpu(int dtype, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                        std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t dx,
                        std::uintptr_t dw, std::uintptr_t db, int threads) {
  if (dtype == 0) {
    const BnTensors<float> t{N, C, L, cp<float>(x), cp<float>(w), cp<float>(mean), cp<float>(rstd)};
    bn_bwd<float>(t, cp<float>(gy), mp<float>(dx), mp<float>(dw), mp<float>(db), threads);
  } else {
    const BnTensors<double> t{N, C, L, cp<double>(x), cp<double>(w), cp<double>(mean), cp<double>(rstd)};
    bn_bwd<double>(t, cp<double>(gy), mp<double>(dx), mp<double>(dw), mp<double>(db), threads);
  }
}

void batch_norm_bwd_bwd_cpu(int dtype, int64_t N, int64_t C, int64_t L, std::uintptr_t x, std::uintptr_t w,
                            std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t gy, std::uintptr_t a,
                            std::uintptr_t bw, std::uintptr_t bb, std::uintptr_t g_gy, std::uintptr_t g_x,
                            std::uintptr_t g_w, int threads) {
  if (dtype == 0) {
    const BnTensors<float> t{N, C, L, cp<float>(x), cp<float>(w), cp<float>(mean), cp<float>(rstd)};
    bn_bwd_bwd<float>(t, cp<float>(gy), cp<float>(a), cp<float>(bw), cp<float>(bb), mp<float>(g_gy), mp<float>(g_x),
                      mp<float>(g_w), threads);
  } else {
    const BnTensors<double> t{N, C, L, cp<double>(x), cp<double>(w), cp<double>(mean), cp<double>(rstd)};
    bn_bwd_bwd<double>(t, cp<double>(gy), cp<double>(a), cp<double>(bw), cp<double>(bb), mp<double>(g_gy),
                       mp<double>(g_x), mp<double>(g_w), threads);
  }
}

}  // namespace fastmaml
