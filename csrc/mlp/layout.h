// mlp: layer sizes, the flat parameter layout and the stored activations (host and
// device). Part of the per-task MLP algorithms; see mlp/mlp.h for the overview.
//
// Conventions (fastmaml/reference/mlp.py): layer l (1..L) maps d[l-1] -> d[l] with
// W_l [d_l, d_{l-1}] row-major and b_l [d_l]; z_l = h_{l-1} W_lᵀ + b_l; h_l = σ(z_l) for
// l < L, the last layer is linear. Activations of N points are stored point-major
// [N, d_l]. Flat parameter order (learning rates, meta-gradients): W_1, b_1, ..., W_L, b_L.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/common.h"

#if defined(__CUDACC__)
#define FM_ALGO __device__ __forceinline__
#else
#define FM_ALGO inline
#endif

namespace fastmaml {
namespace mlp {

// The codes of common/codes.h under this namespace's short names.
constexpr int kMaxLayers = codes::kMlpMaxLayers;
using codes::kCrossEntropy;
using codes::kMse;
using codes::kRelu;
using codes::kTanh;
// Inner learning-rate granularities (docs/DESIGN.md §1); the lr buffer is packed as
// scalar: [1]; table: [K, 2L]; elem: [P] (flat order); step_elem: [K, P].
using LrMode = codes::MlpLrMode;
constexpr LrMode kLrScalar = codes::kMlpLrScalar;
constexpr LrMode kLrTable = codes::kMlpLrTable;
constexpr LrMode kLrElem = codes::kMlpLrElement;
constexpr LrMode kLrStepElem = codes::kMlpLrStepElement;

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

}  // namespace mlp
}  // namespace fastmaml
