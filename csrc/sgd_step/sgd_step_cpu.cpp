// sgd_step on CPU tensors: C++17 + OpenMP, 64-bit indexing throughout.
//
// Work is split into items (tensor i, rows [t0, t1), columns [j0, j1)); an item walks
// its rows (tasks) and, for each, a contiguous run of columns, so the inner loop is a
// unit-stride loop the compiler vectorises. The chunking depends only on the sizes
// (never on the thread count), so the reductions of the backward are deterministic.
// Small calls (the sinusoid MLP: 6 tiny tensors, 44k elements at T = 25) never enter an
// OpenMP region: they run each tensor as one item on the calling thread. A parallel
// region costs about a microsecond of fork/join on an idle machine, and on a busy one
// it waits until the OS schedules every team thread (milliseconds).
#include <algorithm>
#include <cstdint>
#include <string>
#include <stdexcept>
#include <vector>

#include "sgd_step/sgd_step_api.h"
#include "sgd_step/sgd_step.h"

namespace fastmaml {

namespace {

using sgd_step::kLrBroadcast;
using sgd_step::kLrElement;
using sgd_step::kLrValue;

// Below this many output elements a call runs on one thread.
constexpr int64_t kParallelMinElements = int64_t(1) << 16;
// Elements (rows × columns) per work item.
constexpr int64_t kItemElements = int64_t(1) << 15;
// Column-range cap of a backward item (its per-column accumulators live on the stack).
constexpr int64_t kBwdMaxCols = 2048;

struct Item {
  int tensor;
  int64_t t0, t1;  // rows (tasks)
  int64_t j0, j1;  // columns (elements within a task)
};

int64_t round_up16(int64_t x) { return (x + 15) / 16 * 16; }

// Forward items: long contiguous column runs (whole rows when they fit), several rows
// per item for small tensors, so each item streams memory with few page-boundary
// restarts of the hardware prefetcher.
std::vector<Item> make_fwd_items(const SgdStepArgs& a) {
  std::vector<Item> items;
  for (int i = 0; i < static_cast<int>(a.numel.size()); ++i) {
    const int64_t N = a.numel[i], T = a.tasks;
    if (N == 0) continue;
    const int64_t col_chunks = (N + kItemElements - 1) / kItemElements;
    const int64_t cols = std::min(N, round_up16((N + col_chunks - 1) / col_chunks));
    const int64_t rows = std::max<int64_t>(1, kItemElements / cols);
    for (int64_t t0 = 0; t0 < T; t0 += rows)
      for (int64_t j0 = 0; j0 < N; j0 += cols) items.push_back({i, t0, std::min(T, t0 + rows), j0, std::min(N, j0 + cols)});
  }
  return items;
}

// Backward items: all T rows (the sums over tasks stay in one item, in task order) and
// a column range sized to about kItemElements elements. The chunking depends only on
// the sizes, never on the thread count: the reductions are deterministic.
std::vector<Item> make_bwd_items(const SgdStepArgs& a, std::vector<int64_t>* first) {
  std::vector<Item> items;
  const int n = static_cast<int>(a.numel.size());
  first->assign(n + 1, 0);
  for (int i = 0; i < n; ++i) {
    (*first)[i] = static_cast<int64_t>(items.size());
    const int64_t N = a.numel[i];
    const int64_t cols = std::min(kBwdMaxCols, std::max<int64_t>(16, round_up16(kItemElements / a.tasks)));
    for (int64_t j0 = 0; j0 < N; j0 += cols) items.push_back({i, 0, a.tasks, j0, std::min(N, j0 + cols)});
  }
  (*first)[n] = static_cast<int64_t>(items.size());
  return items;
}

template <class S, int Mode>
void fwd_item(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out, const Item& it) {
  const sgd_step::Forward<S> f;
  const int i = it.tensor;
  const int64_t N = a.numel[i];
  const S* theta = reinterpret_cast<const S*>(a.theta[i]);
  const S* g = reinterpret_cast<const S*>(a.grad[i]);
  S* o = reinterpret_cast<S*>(out[i]);
  const S* lr = Mode == kLrValue ? nullptr : reinterpret_cast<const S*>(a.lr[i]);
  const S value = static_cast<S>(a.lr_value);
  const int64_t theta_row = a.shared[i] ? 0 : N;  // a shared θ is read again for every task (cache-resident)
  for (int64_t t = it.t0; t < it.t1; ++t) {
    const S* th = theta + t * theta_row;
    const S* gt = g + t * N;
    S* ot = o + t * N;
    if (Mode == kLrElement) {
#pragma omp simd
      for (int64_t j = it.j0; j < it.j1; ++j) ot[j] = f(th[j], lr[j], gt[j]);
    } else {
      const S alpha = Mode == kLrValue ? value : lr[0];
#pragma omp simd
      for (int64_t j = it.j0; j < it.j1; ++j) ot[j] = f(th[j], alpha, gt[j]);
    }
  }
}

template <class S, int Mode>
void fwd(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out) {
  int64_t total = 0;
  for (int64_t N : a.numel) total += N * a.tasks;
  if (total < kParallelMinElements) {  // one item per tensor, on this thread, no items table
    for (int i = 0; i < static_cast<int>(a.numel.size()); ++i)
      if (a.numel[i] > 0) fwd_item<S, Mode>(a, out, Item{i, 0, a.tasks, 0, a.numel[i]});
    return;
  }
  // Items are handed out one at a time (no reductions here, so the order is free): when
  // the OS deschedules a team thread mid-call, as it does on a busy machine, the other
  // threads take over its remaining items instead of waiting for it to finish half of
  // the work. Each item moves ~256 KB (kItemElements floats), so the hand-out is negligible.
  const std::vector<Item> items = make_fwd_items(a);
  const int64_t n_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t k = 0; k < n_items; ++k) fwd_item<S, Mode>(a, out, items[k]);
}

// One item of the backward: per column j of the item, the task loop accumulates
// Σ_t v (dθ of a shared θ) and Σ_t g·v (dα), and writes dg = −α·v per task.
// Returns the item's Σ g·v (used by the per-tensor dα of lr_mode 1).
template <class S, int Mode>
S bwd_item(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v, const std::vector<std::uintptr_t>& dtheta,
           const std::vector<std::uintptr_t>& dgrad, const std::vector<std::uintptr_t>& dlr, const Item& it) {
  using Acc = typename sgd_step::Acc<S>::type;
  const sgd_step::GradOfG<S> fdg;
  const sgd_step::LrTerm<S> fdl;
  const int i = it.tensor;
  const int64_t N = a.numel[i], T = a.tasks, w = it.j1 - it.j0;
  const S* g = reinterpret_cast<const S*>(a.grad[i]);
  const S* vv = reinterpret_cast<const S*>(v[i]);
  const S* lr = Mode == kLrValue ? nullptr : reinterpret_cast<const S*>(a.lr[i]);
  S* dg = reinterpret_cast<S*>(dgrad[i]);
  S* dth = a.shared[i] ? reinterpret_cast<S*>(dtheta[i]) : nullptr;
  S* dl = reinterpret_cast<S*>(dlr[i]);
  const bool want_dl = dl != nullptr && Mode != kLrValue;
  Acc sum_v[kBwdMaxCols];
  Acc sum_gv[kBwdMaxCols];
  for (int64_t c = 0; c < w; ++c) sum_v[c] = sum_gv[c] = Acc(0);
  const S scalar_alpha = Mode == kLrValue ? static_cast<S>(a.lr_value) : (Mode == kLrBroadcast ? lr[0] : S(0));
  for (int64_t t = 0; t < T; ++t) {
    const S* vt = vv + t * N + it.j0;
    const S* gt = g + t * N + it.j0;
    if (dg != nullptr) {
      S* dgt = dg + t * N + it.j0;
      if (Mode == kLrElement) {
        const S* al = lr + it.j0;
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) dgt[c] = fdg(al[c], vt[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) dgt[c] = fdg(scalar_alpha, vt[c]);
      }
    }
    if (dth != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) sum_v[c] += vt[c];
    }
    if (want_dl) {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) sum_gv[c] += fdl(gt[c], vt[c]);
    }
  }
  if (dth != nullptr)
    for (int64_t c = 0; c < w; ++c) dth[it.j0 + c] = static_cast<S>(sum_v[c]);
  Acc item_sum = Acc(0);
  if (want_dl) {
    if (Mode == kLrElement) {
      for (int64_t c = 0; c < w; ++c) dl[it.j0 + c] = static_cast<S>(-sum_gv[c]);
    } else {
      for (int64_t c = 0; c < w; ++c) item_sum += sum_gv[c];
    }
  }
  return static_cast<S>(item_sum);
}

template <class S, int Mode>
void bwd(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v, const std::vector<std::uintptr_t>& dtheta,
         const std::vector<std::uintptr_t>& dgrad, const std::vector<std::uintptr_t>& dlr) {
  std::vector<int64_t> first;
  const std::vector<Item> items = make_bwd_items(a, &first);
  int64_t total = 0;
  for (int64_t N : a.numel) total += N * a.tasks;
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<S> partial(items.size(), S(0));
  if (total < kParallelMinElements) {  // same items, same order of the sums: no OpenMP region
    for (int64_t k = 0; k < n_items; ++k) partial[k] = bwd_item<S, Mode>(a, v, dtheta, dgrad, dlr, items[k]);
  } else {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < n_items; ++k) partial[k] = bwd_item<S, Mode>(a, v, dtheta, dgrad, dlr, items[k]);
  }
  if (Mode == kLrBroadcast) {
    // dα of tensor i = −(sum of its items' partials, in item order): deterministic.
    for (size_t i = 0; i < a.numel.size(); ++i) {
      if (dlr[i] == 0) continue;
      typename sgd_step::Acc<S>::type s = 0;
      for (int64_t k = first[i]; k < first[i + 1]; ++k) s += partial[k];
      *reinterpret_cast<S*>(dlr[i]) = static_cast<S>(-s);
    }
  }
}

template <class S, template <class, int> class Fn, class... Args>
void dispatch_mode(int mode, Args&&... args) {
  if (mode == kLrValue) return Fn<S, kLrValue>::run(args...);
  if (mode == kLrBroadcast) return Fn<S, kLrBroadcast>::run(args...);
  return Fn<S, kLrElement>::run(args...);
}

template <class S, int Mode>
struct FwdRun {
  static void run(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out) { fwd<S, Mode>(a, out); }
};
template <class S, int Mode>
struct BwdRun {
  static void run(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v, const std::vector<std::uintptr_t>& dth,
                  const std::vector<std::uintptr_t>& dg, const std::vector<std::uintptr_t>& dl) {
    bwd<S, Mode>(a, v, dth, dg, dl);
  }
};

// The checks below build their messages only on failure (require() takes a finished
// string: building one per check and tensor was a measurable part of a small call).
[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("fastmaml._C: " + what); }

void check_outputs(const SgdStepArgs& a, const std::vector<std::uintptr_t>& p, const char* name, bool allow_null) {
  if (p.size() != a.numel.size())
    fail(std::string(name) + ": expected " + std::to_string(a.numel.size()) + " pointers, got " +
         std::to_string(p.size()));
  if (!allow_null)
    for (size_t i = 0; i < p.size(); ++i)
      if (p[i] == 0 && a.numel[i] != 0) fail(std::string(name) + "[" + std::to_string(i) + "] is a null pointer");
}

}  // namespace

void sgd_step_check_args(const SgdStepArgs& a, const std::vector<std::uintptr_t>* out_or_v) {
  const size_t n = a.numel.size();
  if (a.tasks < 1) fail("tasks (T) must be >= 1, got " + std::to_string(a.tasks));
  if (a.dtype != kFloat32 && a.dtype != kFloat64) fail("dtype code must be 0 (float32) or 1 (float64)");
  if (a.lr_mode < 0 || a.lr_mode > 2) fail("lr_mode must be 0, 1 or 2");
  if (a.theta.size() != n || a.grad.size() != n || a.shared.size() != n)
    fail("theta, grad, shared and numel must have the same length");
  if (a.lr_mode != 0 && a.lr.size() != n) fail("lr must hold one pointer per tensor");
  for (size_t i = 0; i < n; ++i) {
    if (a.numel[i] < 0) fail("numel must be >= 0");
    if (a.numel[i] == 0) continue;
    if (a.theta[i] == 0 || a.grad[i] == 0) fail("null tensor pointer at index " + std::to_string(i));
    if (a.lr_mode != 0 && a.lr[i] == 0) fail("null lr pointer at index " + std::to_string(i));
  }
  if (out_or_v) check_outputs(a, *out_or_v, "out", false);
}

void sgd_step_check_overlap_outputs(const SgdStepArgs& a, const std::vector<std::uintptr_t>* out) {
  // Byte spans of every input and (when given) every output; no two may share memory
  // (docs/DESIGN.md §4): an output overlapping an input would be written while other tasks
  // still read it. Sorted by start, a sweep that tracks the furthest end seen finds an
  // overlapping pair whenever one exists: O(n log n) instead of all pairs.
  struct Span {
    std::uintptr_t lo, hi;
    int role, index;  // role 0 params, 1 grads, 2 lr, 3 out
  };
  const std::uintptr_t es = a.dtype == kFloat64 ? 8 : 4;
  std::vector<Span> spans;
  spans.reserve((out ? 4 : 3) * a.numel.size());
  std::uintptr_t lr_lo = UINTPTR_MAX, lr_hi = 0;
  for (size_t i = 0; i < a.numel.size(); ++i) {
    const std::uintptr_t N = static_cast<std::uintptr_t>(a.numel[i]);
    if (N == 0) continue;
    const std::uintptr_t T = static_cast<std::uintptr_t>(a.tasks);
    spans.push_back({a.theta[i], a.theta[i] + (a.shared[i] ? N : T * N) * es, 0, static_cast<int>(i)});
    spans.push_back({a.grad[i], a.grad[i] + T * N * es, 1, static_cast<int>(i)});
    if (out) spans.push_back({(*out)[i], (*out)[i] + T * N * es, 3, static_cast<int>(i)});
    if (a.lr_mode == sgd_step::kLrElement) {
      spans.push_back({a.lr[i], a.lr[i] + N * es, 2, static_cast<int>(i)});
    } else if (a.lr_mode == sgd_step::kLrBroadcast) {  // one lr tensor: one span over all its entries
      lr_lo = std::min(lr_lo, a.lr[i]);
      lr_hi = std::max(lr_hi, a.lr[i] + es);
    }
  }
  if (lr_hi > 0) spans.push_back({lr_lo, lr_hi, 2, -1});
  std::sort(spans.begin(), spans.end(), [](const Span& x, const Span& y) { return x.lo < y.lo; });
  auto name = [](const Span& s) {
    static const char* roles[] = {"params", "grads", "lr", "out"};
    return std::string(roles[s.role]) + (s.index >= 0 ? "[" + std::to_string(s.index) + "]" : std::string());
  };
  size_t far = 0;
  for (size_t k = 1; k < spans.size(); ++k) {
    if (spans[k].lo < spans[far].hi) {
      const Span& x = spans[far].role == 3 ? spans[far] : spans[k];  // name an output first
      const Span& y = spans[far].role == 3 ? spans[k] : spans[far];
      if (x.role == 3)
        throw std::invalid_argument("sgd_step: " + name(x) + " overlaps " + name(y) +
                                    " in memory; every out tensor must be separate memory from the inputs and "
                                    "from the other outputs (in-place out=params is not supported: a shared "
                                    "θ is read by every task while it is written); use a second set of "
                                    "buffers");
      throw std::invalid_argument("sgd_step: " + name(spans[far]) + " and " + name(spans[k]) +
                                  " overlap in memory; pass separate tensors (e.g. " + name(spans[k]) +
                                  ".clone())");
    }
    if (spans[k].hi > spans[far].hi) far = k;
  }
}

void sgd_step_check_overlap(const SgdStepArgs& a) { sgd_step_check_overlap_outputs(a, nullptr); }

void sgd_step_fwd_cpu(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out) {
  sgd_step_check_args(a, &out);
  sgd_step_check_overlap_outputs(a, &out);  // out may be caller-provided (ops.sgd_step's out=)
  if (a.dtype == kFloat32)
    dispatch_mode<float, FwdRun>(a.lr_mode, a, out);
  else
    dispatch_mode<double, FwdRun>(a.lr_mode, a, out);
}

void sgd_step_bwd_cpu(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v,
                      const std::vector<std::uintptr_t>& dtheta, const std::vector<std::uintptr_t>& dgrad,
                      const std::vector<std::uintptr_t>& dlr) {
  sgd_step_check_args(a, &v);
  check_outputs(a, dtheta, "dtheta", true);
  check_outputs(a, dgrad, "dgrad", true);
  check_outputs(a, dlr, "dlr", true);
  if (a.dtype == kFloat32)
    dispatch_mode<float, BwdRun>(a.lr_mode, a, v, dtheta, dgrad, dlr);
  else
    dispatch_mode<double, BwdRun>(a.lr_mode, a, v, dtheta, dgrad, dlr);
}

}  // namespace fastmaml
