// mlp: the whole MAML meta-step of one task (K inner steps, the multi-step query loss
// and the adjoint recursion of docs/DESIGN.md §1), on the per-task algorithm of
// mlp/task.h.
#pragma once

#include <type_traits>

#include "mlp/task.h"

namespace fastmaml {
namespace mlp {


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

#if !defined(__CUDACC__) && !defined(FM_CUDA_EMULATED_TU)
// CPU, a rate per tensor and step whose gradient is not needed (n_lr == 0): the backward
// pass at θ_k (the stored activations `a`, as backward) fused with the SGD step into
// `next` (θ_{k+1}'s W and b): W' = W + (−α δ)ᵀ h runs as one product that starts from W,
// so the weight gradient is never written out and read back (for a wide layer two
// memory-bound passes over W's size). ∇b goes to grad.b as in backward; `scratch` holds
// −α δ ([N, max d] elements).
template <class S>
inline void backward_sgd(SerialGroup g, const MamlArgs<S>& args, int k, int N, const S* x, const Params<const S>& th,
                         const Acts<S>& a, const Params<S>& grad, S* next, S* scratch) {
  const Shape& s = args.s;
  for (int l = s.L - 1; l >= 0; --l) {
    const int din = s.d[l], dout = s.d[l + 1];
    const S* hin = l == 0 ? x : a.H[l - 1];
    const S aw = lr_at(args, k, 2 * l, 0), ab = lr_at(args, k, 2 * l + 1, 0);
    colsum(g, N, dout, a.D[l], grad.b[l], false);  // ∇b_l = Σ_n δ_l
    S* nB = next + s.boff[l];
    for (int i = 0; i < dout; ++i) nB[i] = th.b[l][i] - ab * grad.b[l][i];
    const S* D = a.D[l];
    for (int64_t i = 0; i < int64_t(N) * dout; ++i) scratch[i] = -aw * D[i];
    gemm_tn_init(g, N, dout, din, static_cast<const S*>(scratch), hin, th.W[l], next + s.woff[l]);
    if (l > 0) delta_below(g, s, N, l, th, a);
  }
}
#endif

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
    S* next = theta + k * PT;
    bool stepped = false;  // the backward and the SGD step done by the fused CPU pass
#if !defined(__CUDACC__) && !defined(FM_CUDA_EMULATED_TU)
    if constexpr (std::is_same_v<G, SerialGroup>) {
      if (a.n_lr == 0 && (a.lr_mode == kLrScalar || a.lr_mode == kLrTable)) {
        backward_sgd(g, a, k, a.Ns, xs, th, ak, gk, next, scratch);  // scratch: free until the query pass
        stepped = true;
      }
    }
#endif
    if (!stepped) {
      backward(g, s, a.Ns, xs, th, ak, gk);
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
    }
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

  if (a.first_order && a.n_lr == 0) {
    // First order, rates not learned: the adjoint is the weighted sum of the query
    // gradients, added straight into dM/dθ (no v, no HVP): one pass over P per nonzero
    // weight instead of three (zero v, accumulate v, add v), which for a wide MLP are
    // memory-bound passes over the whole parameter vector.
    for (int k = 0; k < K; ++k) {
      if (a.msl[k] == S(0)) continue;
      const S w = a.msl[k] * a.inv_T;
      const S* gqk = q_slot(k);
      for (int64_t i = g.rank(); i < P; i += g.size()) dtheta_acc[i] += w * gqk[i];
      g.sync();
    }
    return;
  }

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
