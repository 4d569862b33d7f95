// CPU launchers of the MLP ops: OpenMP over tasks, one task per thread at a time, the
// per-task algorithm of mlp/mlp.h run with the SerialGroup policy. The meta-gradient of
// maml_mlp is summed over tasks in a fixed order (fixed chunks of tasks, each summed in
// task order, then the chunk partials in chunk order; the chunking depends on T only),
// so results are bitwise reproducible from run to run and for any thread count.
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "mlp/mlp.h"
#include "mlp/mlp_api.h"

namespace fastmaml {
namespace {

using mlp::Acts;
using mlp::Params;
using mlp::Shape;

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// One reusable buffer (the bindings hold the GIL, so calls never overlap): no allocation
// and no page faults in the hot path after the first call of a given size.
std::vector<double>& scratch_buffer() {
  static std::vector<double> buf;
  return buf;
}
template <class S>
S* scratch(int64_t elems) {
  auto& buf = scratch_buffer();
  const size_t need = size_t((elems * int64_t(sizeof(S)) + 7) / 8) + 8;
  if (buf.size() < need) buf.resize(need);
  return reinterpret_cast<S*>(buf.data());
}

Shape shape_of(const std::vector<int>& dims, int act, int loss) {
  require(dims.size() >= 2, "dims must hold at least 2 widths");
  require(act == mlp::kRelu || act == mlp::kTanh, "activation code must be 0 (relu) or 1 (tanh)");
  require(loss == mlp::kMse || loss == mlp::kCrossEntropy, "loss code must be 0 (mse) or 1 (cross_entropy)");
  return mlp::make_shape(dims.data(), int(dims.size()) - 1, act, loss);
}

template <class S, class P>
Params<P> task_params(const Shape& s, const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
                      int64_t t, const char* name) {
  require(int(W.size()) == s.L && int(b.size()) == s.L, std::string(name) + ": one pointer per layer expected");
  Params<P> p;
  for (int l = 0; l < s.L; ++l) {
    p.W[l] = as_ptr<S>(W[l], name) + t * int64_t(s.d[l + 1]) * s.d[l];
    p.b[l] = as_ptr<S>(b[l], name) + t * int64_t(s.d[l + 1]);
    p.WT[l] = nullptr;
  }
  return p;
}

const void* task_y(const Shape& s, std::uintptr_t y, int64_t t, int N, int dtype_size) {
  const char* base = reinterpret_cast<const char*>(y);
  return s.loss == mlp::kMse ? base + t * N * s.d[s.L] * dtype_size : base + t * N * int64_t(sizeof(int64_t));
}

template <class S>
void loss_and_grad_impl(const Shape& s, int64_t T, int N, std::uintptr_t x, std::uintptr_t y,
                        const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
                        std::uintptr_t out_loss, const std::vector<std::uintptr_t>& gW,
                        const std::vector<std::uintptr_t>& gb) {
  const int64_t per = mlp::acts_size(s, N) + s.PT + 8;
  S* ws = scratch<S>(per * max_threads());
  const S* X = as_ptr<const S>(x, "x");
  as_ptr<const void>(y, "y");
  S* lo = as_ptr<S>(out_loss, "out_loss");
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    SerialGroup g;
    S* w = ws + per * thread_id();
    const Acts<S> a = mlp::carve_acts(s, N, w);
    auto th = task_params<S, const S>(s, W, b, t, "weights");
    const auto thT = mlp::flat_params(s, w + mlp::acts_size(s, N), true);
    for (int l = 0; l < s.L; ++l) th.WT[l] = thT.WT[l];
    mlp::fill_transposes(g, s, th, thT.WT);
    const auto gr = task_params<S, S>(s, gW, gb, t, "grad");
    const S* xt = X + t * N * s.d[0];
    lo[t] = mlp::forward_loss(g, s, N, xt, task_y(s, y, t, N, sizeof(S)), th, a, static_cast<S*>(nullptr));
    mlp::backward(g, s, N, xt, th, a, gr);
  }
}

template <class S>
void hvp_impl(const Shape& s, int64_t T, int N, std::uintptr_t x, std::uintptr_t y,
              const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
              const std::vector<std::uintptr_t>& vW, const std::vector<std::uintptr_t>& vb,
              const std::vector<std::uintptr_t>& hW, const std::vector<std::uintptr_t>& hb) {
  const int64_t per = mlp::acts_size(s, N) + mlp::hvp_scratch_size(s, N) + s.P + 2 * s.PT + 8;
  S* ws = scratch<S>(per * max_threads());
  const S* X = as_ptr<const S>(x, "x");
  as_ptr<const void>(y, "y");
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    SerialGroup g;
    S* w = ws + per * thread_id();
    const Acts<S> a = mlp::carve_acts(s, N, w);
    S* grad = w + mlp::acts_size(s, N);  // the gradient itself is not returned
    S* hs = grad + s.P;
    S* tbuf = hs + mlp::hvp_scratch_size(s, N);
    auto th = task_params<S, const S>(s, W, b, t, "weights");
    auto vv = task_params<S, const S>(s, vW, vb, t, "v");
    const auto thT = mlp::flat_params(s, tbuf, true);
    const auto vT = mlp::flat_params(s, tbuf + s.PT, true);
    for (int l = 0; l < s.L; ++l) {
      th.WT[l] = thT.WT[l];
      vv.WT[l] = vT.WT[l];
    }
    mlp::fill_transposes(g, s, th, thT.WT);
    mlp::fill_transposes(g, s, vv, vT.WT);
    const auto hv = task_params<S, S>(s, hW, hb, t, "hv");
    const S* xt = X + t * N * s.d[0];
    mlp::forward_loss(g, s, N, xt, task_y(s, y, t, N, sizeof(S)), th, a, static_cast<S*>(nullptr));
    mlp::backward(g, s, N, xt, th, a, mlp::flat_params(s, grad));
    mlp::hvp(g, s, N, xt, th, a, vv, hv, hs);
  }
}

using Clock = std::chrono::steady_clock;

// Thread count of the fused meta-step when the cores are shared. On an oversubscribed
// machine a parallel region can stall for whole scheduler time slices (neither thread
// runs for the first milliseconds of the region; the measurements: benchmarks/RESULTS.md,
// section "csrc/mlp/mlp_cpu.cpp"). So each parallel call compares its wall time with the
// work its threads did (the sum of their CPU times in the loop): a healthy run takes about
// work / threads; when it takes longer than the work itself plus 200 µs, the threads
// bought nothing, and the next `backoff` calls run on one thread before 2+ threads are
// tried again (backoff doubles while the stalls persist, up to 512 calls, and resets
// after a healthy parallel call). Results do not depend on it: the chunking and the
// summation order depend on T only. The bindings hold the GIL, so calls never overlap
// and plain statics suffice.
double thread_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct Oversubscription {
  int64_t serial_left = 0;
  int64_t backoff = 4;
  int threads(int nmax) {
    if (nmax > 1 && serial_left > 0) {
      --serial_left;
      return 1;
    }
    return nmax;
  }
  void record(double wall_s, double work_s) {
    if (wall_s > work_s + 200e-6) {
      serial_left = backoff;
      backoff = std::min<int64_t>(backoff * 2, 512);
    } else {
      backoff = 4;
    }
  }
};
Oversubscription g_oversub;

// Fixed chunking of the tasks for the deterministic meta-gradient sum: depends on T only.
int64_t chunk_size(int64_t T) { return std::max<int64_t>(1, T / 64); }

template <class S>
void maml_impl(const Shape& s, int64_t T, int K, int Ns, int Nq, const std::vector<std::uintptr_t>& W,
               const std::vector<std::uintptr_t>& b, std::uintptr_t xs, std::uintptr_t ys, std::uintptr_t xq,
               std::uintptr_t yq, int lr_mode, std::uintptr_t lr, double lr_value, std::uintptr_t msl,
               bool first_order, bool need_grad, int64_t n_lr, std::uintptr_t out_loss,
               const std::vector<std::uintptr_t>& out_dtheta, std::uintptr_t out_dlr) {
  mlp::MamlArgs<S> a = mlp::make_maml_args<S>(s, T, K, Ns, Nq, xs, ys, xq, yq, lr_mode, lr, lr_value, msl,
                                               first_order, need_grad, n_lr);
  a.th0 = task_params<S, const S>(s, W, b, 0, "weights");
  S* lo = as_ptr<S>(out_loss, "out_loss");
  // dθ goes straight into the 2L gradient tensors (flat order W_1, b_1, ...).
  S* dst[2 * mlp::kMaxLayers] = {};
  int64_t seg[2 * mlp::kMaxLayers + 1] = {};
  if (need_grad) {
    require(int(out_dtheta.size()) == 2 * s.L, "out_dtheta: one pointer per parameter tensor expected");
    for (int l = 0; l < s.L; ++l) {
      dst[2 * l] = as_ptr<S>(out_dtheta[2 * l], "out_dtheta");
      dst[2 * l + 1] = as_ptr<S>(out_dtheta[2 * l + 1], "out_dtheta");
      seg[2 * l] = s.woff[l];
      seg[2 * l + 1] = s.boff[l];
    }
    seg[2 * s.L] = s.P;
  }
  S* dlr = (need_grad && n_lr > 0) ? as_ptr<S>(out_dlr, "out_dlr") : nullptr;

  int n_q = 0;
  for (int k = 0; k < K; ++k) n_q += a.msl[k] != S(0);
  const int64_t per = mlp::maml_workspace_size(s, K, Ns, Nq, a.n_lr > 0 ? K : 1, n_q) + 16;
  const int64_t cs = chunk_size(T);
  const int64_t nchunks = (T + cs - 1) / cs;
  const int64_t stride = 1 + (need_grad ? s.P + a.n_lr : 0);
  const int nth_max = max_threads();
  const int nth = int(std::min<int64_t>(g_oversub.threads(nth_max), nchunks));
  S* ws = scratch<S>(per * nth_max + nchunks * stride);
  S* parts = ws + per * nth_max;
  const int64_t P = s.P;

  // per-thread CPU time in the loop (seconds), a cache line apart
  static std::vector<double> busy;
  if (busy.size() < size_t(8 * nth)) busy.resize(size_t(8 * nth));
  const Clock::time_point t_start = Clock::now();
#pragma omp parallel num_threads(nth)
  {
    const int tid = thread_id();
    S* w = ws + per * tid;
    SerialGroup g;
    const double c0 = nth > 1 ? thread_cpu_seconds() : 0.0;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t c = 0; c < nchunks; ++c) {
      S* part = parts + c * stride;
      std::fill(part, part + stride, S(0));
      const int64_t t1 = std::min(T, (c + 1) * cs);
      for (int64_t t = c * cs; t < t1; ++t) mlp::maml_task(g, a, t, w, static_cast<S*>(nullptr), part, part + 1, part + 1 + P);
    }
    if (nth > 1) busy[size_t(8 * tid)] = thread_cpu_seconds() - c0;
  }
  if (nth > 1) {
    double work = 0;
    for (int i = 0; i < nth; ++i) work += busy[size_t(8 * i)];
    g_oversub.record(std::chrono::duration<double>(Clock::now() - t_start).count(), work);
  }
  // Sum the chunk partials in chunk order, element by element (serially: a few µs, and
  // no second barrier, which costs far more when the cores are shared).
  if (need_grad) {
    for (int j = 0; j < 2 * s.L + 1; ++j) {
      const int64_t i0 = j < 2 * s.L ? seg[j] : P, i1 = j < 2 * s.L ? seg[j + 1] : P + a.n_lr;
      if (i1 == i0) continue;  // no lr gradient: dlr may be null (no pointer arithmetic on it)
      S* out = j < 2 * s.L ? dst[j] : dlr;  // out[i - i0] is element i of the flat gradient
      for (int64_t i = i0; i < i1; ++i) out[i - i0] = parts[1 + i];
      for (int64_t c = 1; c < nchunks; ++c) {
        const S* pc = parts + c * stride + 1;
#pragma omp simd
        for (int64_t i = i0; i < i1; ++i) out[i - i0] += pc[i];
      }
    }
  }
  S loss = S(0);
  for (int64_t c = 0; c < nchunks; ++c) loss += parts[c * stride];
  *lo = loss;
}

}  // namespace

void mlp_loss_and_grad_cpu(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int N,
                           std::uintptr_t x, std::uintptr_t y, const std::vector<std::uintptr_t>& W,
                           const std::vector<std::uintptr_t>& b, std::uintptr_t out_loss,
                           const std::vector<std::uintptr_t>& gW, const std::vector<std::uintptr_t>& gb) {
  const Shape s = shape_of(dims, act, loss);
  require(T >= 1 && N >= 1, "T and N must be >= 1");
  if (dtype == kFloat32)
    loss_and_grad_impl<float>(s, T, N, x, y, W, b, out_loss, gW, gb);
  else if (dtype == kFloat64)
    loss_and_grad_impl<double>(s, T, N, x, y, W, b, out_loss, gW, gb);
  else
    require(false, "dtype code must be 0 (float32) or 1 (float64)");
}

void mlp_hvp_cpu(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int N, std::uintptr_t x,
                 std::uintptr_t y, const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
                 const std::vector<std::uintptr_t>& vW, const std::vector<std::uintptr_t>& vb,
                 const std::vector<std::uintptr_t>& hW, const std::vector<std::uintptr_t>& hb) {
  const Shape s = shape_of(dims, act, loss);
  require(T >= 1 && N >= 1, "T and N must be >= 1");
  if (dtype == kFloat32)
    hvp_impl<float>(s, T, N, x, y, W, b, vW, vb, hW, hb);
  else if (dtype == kFloat64)
    hvp_impl<double>(s, T, N, x, y, W, b, vW, vb, hW, hb);
  else
    require(false, "dtype code must be 0 (float32) or 1 (float64)");
}

// Index of the first of the contiguous float tensors (data pointers, element counts)
// that holds a NaN or Inf, or -1: the MAML layer's input check in one call (a few µs
// for a meta-batch) instead of one torch reduction per tensor. Branch-free inner loop
// (x − x is 0 for finite x, NaN for NaN and ±Inf), so it vectorises.
template <class S>
int64_t first_nonfinite_impl(const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& counts) {
  for (size_t j = 0; j < ptrs.size(); ++j) {
    const S* p = reinterpret_cast<const S*>(ptrs[j]);
    S acc = S(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < counts[j]; ++i) acc += p[i] - p[i];
    if (acc != S(0)) return int64_t(j);
  }
  return -1;
}

int64_t first_nonfinite_cpu(int dtype, const std::vector<std::uintptr_t>& ptrs, const std::vector<int64_t>& counts) {
  require(ptrs.size() == counts.size(), "ptrs and counts must have the same length");
  for (size_t j = 0; j < ptrs.size(); ++j) {
    require(counts[j] >= 0, "counts must be >= 0");
    require(counts[j] == 0 || ptrs[j] != 0, "a null pointer with a nonzero count");
  }
  if (dtype == kFloat32) return first_nonfinite_impl<float>(ptrs, counts);
  require(dtype == kFloat64, "dtype code must be 0 (float32) or 1 (float64)");
  return first_nonfinite_impl<double>(ptrs, counts);
}

int64_t maml_mlp_workspace_elems(const std::vector<int>& dims, int K, int Ns, int Nq, bool lr_learned, int n_msl) {
  const Shape s = shape_of(dims, 0, 0);
  require(n_msl >= 0 && n_msl <= K, "n_msl must be in [0, steps]");
  return mlp::maml_workspace_size(s, K, Ns, Nq, lr_learned ? K : 1, n_msl);
}

void maml_mlp_cpu(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int K, int Ns, int Nq,
                  const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b, std::uintptr_t xs,
                  std::uintptr_t ys, std::uintptr_t xq, std::uintptr_t yq, int lr_mode, std::uintptr_t lr,
                  double lr_value, std::uintptr_t msl, bool first_order, bool need_grad, int64_t n_lr,
                  std::uintptr_t out_loss, const std::vector<std::uintptr_t>& out_dtheta, std::uintptr_t out_dlr) {
  const Shape s = shape_of(dims, act, loss);
  require(T >= 1 && K >= 1 && Ns >= 1 && Nq >= 1, "T, steps, Ns and Nq must be >= 1");
  require(lr_mode >= 0 && lr_mode <= 3, "lr_mode must be in [0, 3]");
  if (dtype == kFloat32)
    maml_impl<float>(s, T, K, Ns, Nq, W, b, xs, ys, xq, yq, lr_mode, lr, lr_value, msl, first_order, need_grad, n_lr,
                     out_loss, out_dtheta, out_dlr);
  else if (dtype == kFloat64)
    maml_impl<double>(s, T, K, Ns, Nq, W, b, xs, ys, xq, yq, lr_mode, lr, lr_value, msl, first_order, need_grad,
                      n_lr, out_loss, out_dtheta, out_dlr);
  else
    require(false, "dtype code must be 0 (float32) or 1 (float64)");
}

}  // namespace fastmaml
