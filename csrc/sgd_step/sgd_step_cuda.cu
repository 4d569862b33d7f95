// sgd_step on CUDA tensors: an apex-style multi-tensor launch.
//
// Every tensor of the call is processed by ONE kernel launch (more only when the
// by-value chunk table fills up: 24 tensors or 256 blocks per launch). The table —
// tensor addresses, sizes, shared-θ flags and the block → tensor / block → chunk maps —
// is the kernel's by-value argument, so there is no host-to-device copy. The per-op
// math is a functor (FwdOp / BwdOp) plugged into the generic multi_tensor_kernel
// (multi_tensor/launch.cuh); the per-element arithmetic is the FM_HD code of
// sgd_step/sgd_step.h that the CPU build runs too.
//
// Geometry: a block is kSgdStepBlockThreads threads, one column j each. Forward blocks
// take kSgdStepFwdRows tasks (rows) per chunk; backward blocks take all T rows, so the
// sums over tasks (dθ of a shared θ, per-element dα) stay in one thread, in task order.
// The per-tensor dα (α broadcast: 0-d or one value per tensor) is reduced in two
// deterministic passes: a tree reduction per block into a workspace slot, then one
// block per tensor sums its blocks' slots in a fixed order. No atomics anywhere, so
// results are bitwise reproducible.
//
// Indexing is 32-bit unless some tensor has T·N ≥ 2^31 elements (or the caller forces
// 64-bit, which the tests use to exercise that instantiation on small tensors).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "common/cuda_device.cuh"
#include "multi_tensor/launch.cuh"
#include "multi_tensor/multi_tensor.h"
#include "sgd_step/sgd_step_api.h"
#include "sgd_step/sgd_step.h"

namespace fastmaml {

namespace {

using sgd_step::kLrBroadcast;
using sgd_step::kLrElement;
using sgd_step::kLrValue;

template <int NPtr>
using SgdTable = TensorTable<NPtr, kSgdStepMaxTensors, kSgdStepMaxBlocks>;
// Kernel parameters are limited to 4 KiB: the table plus the functor must fit.
static_assert(sizeof(SgdTable<6>) + 64 <= 4096, "multi-tensor table too large for a kernel argument");

// ---- sgd_step functors ---------------------------------------------------------------

template <class S, class Index, int Mode>
struct FwdOp {  // table pointers: θ, g, out, α
  Index tasks;
  S lr_value;
  __device__ __forceinline__ void operator()(const SgdTable<4>& t, int b) const {
    const sgd_step::Forward<S> f;
    const int slot = t.block_slot[b];
    const Index N = static_cast<Index>(t.numel[slot]);
    const Index j = static_cast<Index>(t.block_col[b]) * Index(kSgdStepBlockThreads) + static_cast<Index>(threadIdx.x);
    if (j >= N) return;
    const S* theta = static_cast<const S*>(t.ptr[0][slot]);
    const S* g = static_cast<const S*>(t.ptr[1][slot]);
    S* out = static_cast<S*>(t.ptr[2][slot]);
    const S* lr = static_cast<const S*>(t.ptr[3][slot]);
    const Index theta_row = t.shared[slot] ? Index(0) : N;  // a shared θ is re-read per task (L2-resident)
    const S alpha = sgd_step::lr_at<Mode, S, Index>(lr_value, lr, j);
    const Index r0 = static_cast<Index>(t.block_row[b]) * Index(kSgdStepFwdRows);
    const Index r1 = r0 + Index(kSgdStepFwdRows) < tasks ? r0 + Index(kSgdStepFwdRows) : tasks;
    for (Index r = r0; r < r1; ++r) out[r * N + j] = f(theta[r * theta_row + j], alpha, g[r * N + j]);
  }
};

template <class S, class Index, int Mode>
struct BwdOp {  // table pointers: v, g, α, dθ, dg, dα (0 = not requested)
  Index tasks;
  S lr_value;
  S* partials;  // workspace: per-block Σ g·v (Mode == kLrBroadcast), else null
  __device__ __forceinline__ void operator()(const SgdTable<6>& t, int b) const {
    using Acc = typename sgd_step::Acc<S>::type;
    const sgd_step::GradOfG<S> fdg;
    const sgd_step::LrTerm<S> fdl;
    __shared__ Acc red[kSgdStepBlockThreads];
    const int slot = t.block_slot[b];
    const Index N = static_cast<Index>(t.numel[slot]);
    const Index j = static_cast<Index>(t.block_col[b]) * Index(kSgdStepBlockThreads) + static_cast<Index>(threadIdx.x);
    const bool in = j < N;
    const S* v = static_cast<const S*>(t.ptr[0][slot]);
    const S* g = static_cast<const S*>(t.ptr[1][slot]);
    const S* lr = static_cast<const S*>(t.ptr[2][slot]);
    S* dth = t.shared[slot] ? static_cast<S*>(t.ptr[3][slot]) : nullptr;
    S* dg = static_cast<S*>(t.ptr[4][slot]);
    S* dl = static_cast<S*>(t.ptr[5][slot]);
    const bool want_dl = Mode != kLrValue && dl != nullptr;
    Acc sum_v = Acc(0), sum_gv = Acc(0);
    if (in) {
      const S alpha = sgd_step::lr_at<Mode, S, Index>(lr_value, lr, j);
      for (Index r = 0; r < tasks; ++r) {  // the task loop inside the thread: fixed order
        const S vt = v[r * N + j];
        if (dg != nullptr) dg[r * N + j] = fdg(alpha, vt);
        if (dth != nullptr) sum_v += vt;
        if (want_dl) sum_gv += fdl(g[r * N + j], vt);
      }
      if (dth != nullptr) dth[j] = static_cast<S>(sum_v);
      if (Mode == kLrElement && want_dl) dl[j] = static_cast<S>(-sum_gv);
    }
    if (Mode == kLrBroadcast && want_dl) {  // uniform per block: every thread takes part
      red[threadIdx.x] = sum_gv;
      __syncthreads();
      for (int s = kSgdStepBlockThreads / 2; s > 0; s >>= 1) {
        if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
      }
      if (threadIdx.x == 0) partials[t.first_block + b] = static_cast<S>(red[0]);
    }
  }
};

// Second pass of the per-tensor dα: block k sums tensor k's per-block partials.
constexpr int kSegments = 128;
template <class S>
struct SegmentTable {
  int64_t first[kSegments];
  int64_t count[kSegments];
  S* out[kSegments];
};

template <class S>
__global__ void __launch_bounds__(kSgdStepBlockThreads) sum_segments_kernel(SegmentTable<S> table,
                                                                             const S* partials) {
  using Acc = typename sgd_step::Acc<S>::type;
  __shared__ Acc red[kSgdStepBlockThreads];
  const int k = blockIdx.x;
  Acc acc = Acc(0);
  for (int64_t e = threadIdx.x; e < table.count[k]; e += kSgdStepBlockThreads) acc += partials[table.first[k] + e];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kSgdStepBlockThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) *table.out[k] = static_cast<S>(-red[0]);  // dα = −Σ g·v
}

// ---- host side -----------------------------------------------------------------------

template <class S, class Index, int Mode>
void fwd_launch(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out, const MultiTensorPlan& plan,
                cudaStream_t stream) {
  FwdOp<S, Index, Mode> op{static_cast<Index>(a.tasks), static_cast<S>(a.lr_value)};
  auto fill = [&](SgdTable<4>& t, int s, int i) {
    t.ptr[0][s] = reinterpret_cast<void*>(a.theta[i]);
    t.ptr[1][s] = reinterpret_cast<void*>(a.grad[i]);
    t.ptr[2][s] = reinterpret_cast<void*>(out[i]);
    t.ptr[3][s] = Mode == kLrValue ? nullptr : reinterpret_cast<void*>(a.lr[i]);
  };
  multi_tensor_apply<kSgdStepBlockThreads, SgdTable<4>>(plan, a.numel, a.shared, fill, op, stream);
}

template <class S, class Index, int Mode>
void bwd_launch(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v, const std::vector<std::uintptr_t>& dtheta,
                const std::vector<std::uintptr_t>& dgrad, const std::vector<std::uintptr_t>& dlr,
                const MultiTensorPlan& plan, cudaStream_t stream) {
  const size_t n = a.numel.size();
  bool reduce = false;
  if (Mode == kLrBroadcast)
    for (size_t i = 0; i < n; ++i) reduce = reduce || (dlr[i] != 0);
  S* partials = nullptr;
  if (reduce && plan.total_blocks > 0)
    FM_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&partials), plan.total_blocks * sizeof(S), stream));
  BwdOp<S, Index, Mode> op{static_cast<Index>(a.tasks), static_cast<S>(a.lr_value), partials};
  auto fill = [&](SgdTable<6>& t, int s, int i) {
    t.ptr[0][s] = reinterpret_cast<void*>(v[i]);
    t.ptr[1][s] = reinterpret_cast<void*>(a.grad[i]);
    t.ptr[2][s] = Mode == kLrValue ? nullptr : reinterpret_cast<void*>(a.lr[i]);
    t.ptr[3][s] = reinterpret_cast<void*>(dtheta[i]);
    t.ptr[4][s] = reinterpret_cast<void*>(dgrad[i]);
    t.ptr[5][s] = Mode == kLrValue ? nullptr : reinterpret_cast<void*>(dlr[i]);
  };
  try {
    multi_tensor_apply<kSgdStepBlockThreads, SgdTable<6>>(plan, a.numel, a.shared, fill, op, stream);
    if (reduce) {
      SegmentTable<S> seg{};
      int k = 0;
      auto flush = [&]() {
        if (k == 0) return;
        sum_segments_kernel<S><<<k, kSgdStepBlockThreads, 0, stream>>>(seg, partials);
        FM_CUDA_CHECK_LAUNCH();
        seg = SegmentTable<S>{};
        k = 0;
      };
      for (size_t i = 0; i < n; ++i) {
        if (dlr[i] == 0) continue;
        if (a.numel[i] == 0) {  // an empty tensor contributes dα = 0
          FM_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(dlr[i]), 0, sizeof(S), stream));
          continue;
        }
        seg.first[k] = plan.tensor_first_block[i];
        seg.count[k] = plan.tensor_blocks[i];
        seg.out[k] = reinterpret_cast<S*>(dlr[i]);
        if (++k == kSegments) flush();
      }
      flush();
    }
  } catch (...) {
    if (partials) (void)cudaFreeAsync(partials, stream);
    throw;
  }
  if (partials) FM_CUDA_CHECK(cudaFreeAsync(partials, stream));
}

template <class S, class Index>
void fwd_mode(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out, const MultiTensorPlan& p, cudaStream_t s) {
  if (a.lr_mode == kLrValue) return fwd_launch<S, Index, kLrValue>(a, out, p, s);
  if (a.lr_mode == kLrBroadcast) return fwd_launch<S, Index, kLrBroadcast>(a, out, p, s);
  return fwd_launch<S, Index, kLrElement>(a, out, p, s);
}

template <class S, class Index>
void bwd_mode(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v, const std::vector<std::uintptr_t>& dth,
              const std::vector<std::uintptr_t>& dg, const std::vector<std::uintptr_t>& dl, const MultiTensorPlan& p,
              cudaStream_t s) {
  if (a.lr_mode == kLrValue) return bwd_launch<S, Index, kLrValue>(a, v, dth, dg, dl, p, s);
  if (a.lr_mode == kLrBroadcast) return bwd_launch<S, Index, kLrBroadcast>(a, v, dth, dg, dl, p, s);
  return bwd_launch<S, Index, kLrElement>(a, v, dth, dg, dl, p, s);
}

void check_list(const SgdStepArgs& a, const std::vector<std::uintptr_t>& p, const char* name) {
  require(p.size() == a.numel.size(), std::string(name) + ": expected " + std::to_string(a.numel.size()) +
                                          " pointers, got " + std::to_string(p.size()));
}

}  // namespace

void sgd_step_fwd_cuda(const SgdStepArgs& a, const std::vector<std::uintptr_t>& out, int device,
                       std::uintptr_t stream, bool force_index64) {
  sgd_step_check_args(a, &out);
  sgd_step_check_overlap(a);
  DeviceGuard guard(device);
  const MultiTensorPlan plan =
      plan_multi_tensor(a.numel, a.tasks, kSgdStepBlockThreads, kSgdStepFwdRows, kSgdStepMaxTensors, kSgdStepMaxBlocks);
  const bool i64 = force_index64 || plan.needs_index64;
  const cudaStream_t s = as_stream(stream);
  if (a.dtype == kFloat32) {
    if (i64) fwd_mode<float, int64_t>(a, out, plan, s); else fwd_mode<float, int32_t>(a, out, plan, s);
  } else {
    if (i64) fwd_mode<double, int64_t>(a, out, plan, s); else fwd_mode<double, int32_t>(a, out, plan, s);
  }
}

void sgd_step_bwd_cuda(const SgdStepArgs& a, const std::vector<std::uintptr_t>& v,
                       const std::vector<std::uintptr_t>& dtheta, const std::vector<std::uintptr_t>& dgrad,
                       const std::vector<std::uintptr_t>& dlr, int device, std::uintptr_t stream,
                       bool force_index64) {
  sgd_step_check_args(a, &v);
  check_list(a, dtheta, "dtheta");
  check_list(a, dgrad, "dgrad");
  check_list(a, dlr, "dlr");
  DeviceGuard guard(device);
  // Backward blocks take every task (row_chunk = T): the sums over tasks stay in-thread.
  const MultiTensorPlan plan =
      plan_multi_tensor(a.numel, a.tasks, kSgdStepBlockThreads, a.tasks, kSgdStepMaxTensors, kSgdStepMaxBlocks);
  const bool i64 = force_index64 || plan.needs_index64;
  const cudaStream_t s = as_stream(stream);
  if (a.dtype == kFloat32) {
    if (i64) bwd_mode<float, int64_t>(a, v, dtheta, dgrad, dlr, plan, s);
    else bwd_mode<float, int32_t>(a, v, dtheta, dgrad, dlr, plan, s);
  } else {
    if (i64) bwd_mode<double, int64_t>(a, v, dtheta, dgrad, dlr, plan, s);
    else bwd_mode<double, int32_t>(a, v, dtheta, dgrad, dlr, plan, s);
  }
}

}  // namespace fastmaml
