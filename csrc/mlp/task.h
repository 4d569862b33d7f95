// mlp: the per-task algorithm, written once against the thread-group policy G: forward
// with stored activations, backward, and the Hessian-vector product by Pearlmutter's
// R-operator.
#pragma once

#include "mlp/cpu_primitives.h"
#include "mlp/layout.h"
#include "mlp/math.h"
#if defined(__CUDACC__) || defined(FM_CUDA_EMULATED_TU)
#include "mlp/gpu_primitives.cuh"
#endif

namespace fastmaml {
namespace mlp {


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

// One layer down (l > 0): E_{l−1} = e = ∂ℓ/∂h_{l−1} = δ_l W_l and D_{l−1} = δ_{l−1} = σ'(z) e.
template <class S, class G>
FM_ALGO void delta_below(G g, const Shape& s, int N, int l, const Params<const S>& th, const Acts<S>& a) {
  const S* const kNull = nullptr;
  const int din = s.d[l], dout = s.d[l + 1];
  gemm_nn(g, N, din, dout, a.D[l], th.W[l], 0, kNull, kNull, a.E[l - 1], kNull);
  g.sync();
  const S* H = a.H[l - 1];
  const S* E = a.E[l - 1];
  S* D = a.D[l - 1];
  for (int i = g.rank(); i < N * din; i += g.size()) D[i] = act_d1(s.act, H[i]) * E[i];
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
    if (l > 0) delta_below(g, s, N, l, th, a);
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

}  // namespace mlp
}  // namespace fastmaml
