// CUDA launchers of the MLP ops: one CTA per task running the per-task algorithm of
// mlp.h with the CtaGroup policy (the same source the CPU build runs with SerialGroup).
// The task's workspace (activations, parameter copies θ_1..θ_K with transposed weights,
// gradients, the HVP scratch) lives in dynamic shared memory when it fits, else in a
// global-memory buffer (L2-cached) for the per-task ops. The meta-gradient of maml_mlp
// is written as per-task partials and summed over tasks in task order by a second
// kernel: deterministic, no atomics.
#include <string>
#include <vector>

#include "common/cuda_check.h"
#include "mlp/mlp.h"
#include "mlp/mlp_api.h"

namespace fastmaml {
namespace {

using mlp::Acts;
using mlp::Params;
using mlp::Shape;

constexpr int kThreads = 128;

Shape shape_of(const std::vector<int>& dims, int act, int loss) {
  require(dims.size() >= 2, "dims must hold at least 2 widths");
  require(act == mlp::kRelu || act == mlp::kTanh, "activation code must be 0 (relu) or 1 (tanh)");
  require(loss == mlp::kMse || loss == mlp::kCrossEntropy, "loss code must be 0 (mse) or 1 (cross_entropy)");
  return mlp::make_shape(dims.data(), int(dims.size()) - 1, act, loss);
}

template <class S>
Params<S> base_params(const Shape& s, const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
                      const char* name) {
  require(int(W.size()) == s.L && int(b.size()) == s.L, std::string(name) + ": one pointer per layer expected");
  Params<S> p;
  for (int l = 0; l < mlp::kMaxLayers; ++l) {
    p.W[l] = l < s.L ? as_ptr<S>(W[l], name) : nullptr;
    p.b[l] = l < s.L ? as_ptr<S>(b[l], name) : nullptr;
    p.WT[l] = nullptr;
  }
  return p;
}

template <class S>
__device__ Params<S> task_slice(const Shape& s, Params<S> p, int64_t t) {
  for (int l = 0; l < s.L; ++l) {
    p.W[l] += t * int64_t(s.d[l + 1]) * s.d[l];
    p.b[l] += t * int64_t(s.d[l + 1]);
  }
  return p;
}

template <class S>
__device__ const void* task_y(const Shape& s, const void* y, int64_t t, int N) {
  return s.loss == mlp::kMse ? static_cast<const void*>(static_cast<const S*>(y) + t * N * s.d[s.L])
                             : static_cast<const void*>(static_cast<const int64_t*>(y) + t * N);
}

int device_smem_limit() {
  int dev = 0, v = 0;
  FM_CUDA_CHECK(cudaGetDevice(&dev));
  FM_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

// Workspace placement: per-task `per` elements in shared memory when they fit (plus the
// group_sum scratch), else in a global buffer of T·per elements (stream-ordered alloc).
template <class S, class K>
struct Placement {
  size_t smem = 0;
  S* global = nullptr;
  cudaStream_t stream = nullptr;
  Placement(K kernel, int64_t per, int64_t T, cudaStream_t st, bool allow_global) : stream(st) {
    const size_t red = kThreads * sizeof(S);
    const size_t want = size_t(per) * sizeof(S) + red;
    const size_t limit = size_t(device_smem_limit());
    if (want <= limit) {
      smem = want;
    } else {
      require(allow_global, "per-task workspace of " + std::to_string(want) + " bytes exceeds the " +
                                std::to_string(limit) + " bytes of shared memory per block");
      smem = red;
      FM_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&global), size_t(per) * T * sizeof(S), st));
    }
    if (smem > 48 * 1024) FM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  }
  ~Placement() {
    if (global) (void)cudaFreeAsync(global, stream);
  }
};

template <class S>
__device__ __forceinline__ void carve(S* gws, int64_t per, S*& ws, S*& red) {
  extern __shared__ __align__(16) unsigned char fm_smem[];
  S* smem = reinterpret_cast<S*>(fm_smem);
  if (gws) {
    ws = gws + int64_t(blockIdx.x) * per;
    red = smem;
  } else {
    ws = smem;
    red = smem + per;
  }
}

template <class S>
__global__ void loss_and_grad_kernel(Shape s, int N, const S* x, const void* y, Params<const S> th_base,
                                     Params<S> g_base, S* loss, S* gws, int64_t per) {
  S *ws, *red;
  carve(gws, per, ws, red);
  const int64_t t = blockIdx.x;
  CtaGroup g;
  Params<const S> th = task_slice(s, th_base, t);
  const Params<S> gr = task_slice(s, g_base, t);
  const Acts<S> a = mlp::carve_acts(s, N, ws);
  const Params<S> thT = mlp::flat_params(s, ws + mlp::acts_size(s, N), true);
  for (int l = 0; l < s.L; ++l) th.WT[l] = thT.WT[l];
  mlp::fill_transposes(g, s, th, thT.WT);
  const S* xt = x + t * N * s.d[0];
  const S l = mlp::forward_loss(g, s, N, xt, task_y<S>(s, y, t, N), th, a, red);
  if (g.rank() == 0) loss[t] = l;
  mlp::backward(g, s, N, xt, th, a, gr);
}

template <class S>
__global__ void hvp_kernel(Shape s, int N, const S* x, const void* y, Params<const S> th_base,
                           Params<const S> v_base, Params<S> h_base, S* gws, int64_t per) {
  S *ws, *red;
  carve(gws, per, ws, red);
  const int64_t t = blockIdx.x;
  CtaGroup g;
  Params<const S> th = task_slice(s, th_base, t);
  Params<const S> vv = task_slice(s, v_base, t);
  const Params<S> hv = task_slice(s, h_base, t);
  const Acts<S> a = mlp::carve_acts(s, N, ws);
  S* grad = ws + mlp::acts_size(s, N);
  S* hs = grad + s.P;
  S* tbuf = hs + mlp::hvp_scratch_size(s, N);
  const Params<S> thT = mlp::flat_params(s, tbuf, true);
  const Params<S> vT = mlp::flat_params(s, tbuf + s.PT, true);
  for (int l = 0; l < s.L; ++l) {
    th.WT[l] = thT.WT[l];
    vv.WT[l] = vT.WT[l];
  }
  mlp::fill_transposes(g, s, th, thT.WT);
  mlp::fill_transposes(g, s, vv, vT.WT);
  const S* xt = x + t * N * s.d[0];
  const void* yt = task_y<S>(s, y, t, N);
  mlp::forward_loss(g, s, N, xt, yt, th, a, red);
  mlp::backward(g, s, N, xt, th, a, mlp::flat_params(s, grad));
  mlp::hvp(g, s, N, xt, th, a, vv, hv, hs);
}

template <class S>
__global__ void maml_kernel(mlp::MamlArgs<S> a, S* partials, int64_t stride, S* gws, int64_t per) {
  S *ws, *red;
  carve(gws, per, ws, red);
  const int64_t t = blockIdx.x;
  CtaGroup g;
  S* part = partials + t * stride;
  for (int64_t i = g.rank(); i < stride; i += g.size()) part[i] = S(0);
  g.sync();
  mlp::maml_task(g, a, t, ws, red, part, part + 1, part + 1 + a.s.P);
}

// Where the flat meta-gradient goes: tensor j holds flat elements [seg[j], seg[j+1]).
template <class S>
struct GradOut {
  S* dst[2 * mlp::kMaxLayers];
  int64_t seg[2 * mlp::kMaxLayers + 1];
  int n;
};

// out_i = Σ_t partials[t][i] in task order (one thread per element): deterministic.
template <class S>
__global__ void reduce_tasks_kernel(const S* partials, int64_t T, int64_t stride, int64_t P, S* loss, GradOut<S> go,
                                    S* dlr) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= stride) return;
  S acc = S(0);
  for (int64_t t = 0; t < T; ++t) acc += partials[t * stride + i];
  if (i == 0) {
    *loss = acc;
  } else if (i <= P) {
    int j = 0;
    while (i - 1 >= go.seg[j + 1]) ++j;
    go.dst[j][i - 1 - go.seg[j]] = acc;
  } else {
    dlr[i - 1 - P] = acc;
  }
}

template <class S>
void loss_and_grad_impl(const Shape& s, int64_t T, int N, std::uintptr_t x, std::uintptr_t y,
                        const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
                        std::uintptr_t out_loss, const std::vector<std::uintptr_t>& gW,
                        const std::vector<std::uintptr_t>& gb, cudaStream_t st) {
  const int64_t per = mlp::acts_size(s, N) + s.PT + 8;
  Placement<S, decltype(&loss_and_grad_kernel<S>)> pl(&loss_and_grad_kernel<S>, per, T, st, true);
  loss_and_grad_kernel<S><<<unsigned(T), kThreads, pl.smem, st>>>(
      s, N, as_ptr<const S>(x, "x"), as_ptr<const void>(y, "y"), base_params<const S>(s, W, b, "weights"),
      base_params<S>(s, gW, gb, "grad"), as_ptr<S>(out_loss, "out_loss"), pl.global, per);
  FM_CUDA_CHECK_LAUNCH();
}

template <class S>
void hvp_impl(const Shape& s, int64_t T, int N, std::uintptr_t x, std::uintptr_t y,
              const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
              const std::vector<std::uintptr_t>& vW, const std::vector<std::uintptr_t>& vb,
              const std::vector<std::uintptr_t>& hW, const std::vector<std::uintptr_t>& hb, cudaStream_t st) {
  const int64_t per = mlp::acts_size(s, N) + mlp::hvp_scratch_size(s, N) + s.P + 2 * s.PT + 8;
  Placement<S, decltype(&hvp_kernel<S>)> pl(&hvp_kernel<S>, per, T, st, true);
  hvp_kernel<S><<<unsigned(T), kThreads, pl.smem, st>>>(
      s, N, as_ptr<const S>(x, "x"), as_ptr<const void>(y, "y"), base_params<const S>(s, W, b, "weights"),
      base_params<const S>(s, vW, vb, "v"), base_params<S>(s, hW, hb, "hv"), pl.global, per);
  FM_CUDA_CHECK_LAUNCH();
}

template <class S>
void maml_impl(const Shape& s, int64_t T, int K, int Ns, int Nq, const std::vector<std::uintptr_t>& W,
               const std::vector<std::uintptr_t>& b, std::uintptr_t xs, std::uintptr_t ys, std::uintptr_t xq,
               std::uintptr_t yq, int lr_mode, std::uintptr_t lr, double lr_value, std::uintptr_t msl,
               bool first_order, bool need_grad, int64_t n_lr, int n_msl, std::uintptr_t out_loss,
               const std::vector<std::uintptr_t>& out_dtheta, std::uintptr_t out_dlr, std::uintptr_t partials,
               cudaStream_t st) {
  mlp::MamlArgs<S> a = mlp::make_maml_args<S>(s, T, K, Ns, Nq, xs, ys, xq, yq, lr_mode, lr, lr_value, msl,
                                               first_order, need_grad, n_lr);
  a.th0 = base_params<const S>(s, W, b, "weights");
  const int64_t stride = 1 + (need_grad ? s.P + a.n_lr : 0);
  S* parts = as_ptr<S>(partials, "partials");
  // the MSL weights live on the device: the launcher is told how many are nonzero
  const int64_t per = mlp::maml_workspace_size(s, K, Ns, Nq, a.n_lr > 0 ? K : 1, n_msl) + 16;
  Placement<S, decltype(&maml_kernel<S>)> pl(&maml_kernel<S>, per, T, st, false);
  maml_kernel<S><<<unsigned(T), kThreads, pl.smem, st>>>(a, parts, stride, pl.global, per);
  FM_CUDA_CHECK_LAUNCH();
  GradOut<S> go{};
  if (need_grad) {
    require(int(out_dtheta.size()) == 2 * s.L, "out_dtheta: one pointer per parameter tensor expected");
    go.n = 2 * s.L;
    for (int l = 0; l < s.L; ++l) {
      go.dst[2 * l] = as_ptr<S>(out_dtheta[2 * l], "out_dtheta");
      go.dst[2 * l + 1] = as_ptr<S>(out_dtheta[2 * l + 1], "out_dtheta");
      go.seg[2 * l] = s.woff[l];
      go.seg[2 * l + 1] = s.boff[l];
    }
    go.seg[2 * s.L] = s.P;
  }
  S* dlr = (need_grad && n_lr > 0) ? as_ptr<S>(out_dlr, "out_dlr") : nullptr;
  const int threads = 256;
  reduce_tasks_kernel<S><<<unsigned((stride + threads - 1) / threads), threads, 0, st>>>(
      parts, T, stride, s.P, as_ptr<S>(out_loss, "out_loss"), go, dlr);
  FM_CUDA_CHECK_LAUNCH();
}

void check_grid(int64_t T) { require(T >= 1 && T <= 2147483647LL, "T must be in [1, 2^31)"); }

}  // namespace

void mlp_loss_and_grad_cuda(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int N,
                            std::uintptr_t x, std::uintptr_t y, const std::vector<std::uintptr_t>& W,
                            const std::vector<std::uintptr_t>& b, std::uintptr_t out_loss,
                            const std::vector<std::uintptr_t>& gW, const std::vector<std::uintptr_t>& gb,
                            std::uintptr_t stream) {
  const Shape s = shape_of(dims, act, loss);
  check_grid(T);
  require(N >= 1, "N must be >= 1");
  if (dtype == kFloat32)
    loss_and_grad_impl<float>(s, T, N, x, y, W, b, out_loss, gW, gb, as_stream(stream));
  else if (dtype == kFloat64)
    loss_and_grad_impl<double>(s, T, N, x, y, W, b, out_loss, gW, gb, as_stream(stream));
  else
    require(false, "dtype code must be 0 (float32) or 1 (float64)");
}

void mlp_hvp_cuda(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int N, std::uintptr_t x,
                  std::uintptr_t y, const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b,
                  const std::vector<std::uintptr_t>& vW, const std::vector<std::uintptr_t>& vb,
                  const std::vector<std::uintptr_t>& hW, const std::vector<std::uintptr_t>& hb, std::uintptr_t stream) {
  const Shape s = shape_of(dims, act, loss);
  check_grid(T);
  require(N >= 1, "N must be >= 1");
  if (dtype == kFloat32)
    hvp_impl<float>(s, T, N, x, y, W, b, vW, vb, hW, hb, as_stream(stream));
  else if (dtype == kFloat64)
    hvp_impl<double>(s, T, N, x, y, W, b, vW, vb, hW, hb, as_stream(stream));
  else
    require(false, "dtype code must be 0 (float32) or 1 (float64)");
}

void maml_mlp_cuda(int dtype, const std::vector<int>& dims, int act, int loss, int64_t T, int K, int Ns, int Nq,
                   const std::vector<std::uintptr_t>& W, const std::vector<std::uintptr_t>& b, std::uintptr_t xs,
                   std::uintptr_t ys, std::uintptr_t xq, std::uintptr_t yq, int lr_mode, std::uintptr_t lr,
                   double lr_value, std::uintptr_t msl, bool first_order, bool need_grad, int64_t n_lr,
                   int n_msl, std::uintptr_t out_loss, const std::vector<std::uintptr_t>& out_dtheta,
                   std::uintptr_t out_dlr, std::uintptr_t partials, std::uintptr_t stream) {
  const Shape s = shape_of(dims, act, loss);
  check_grid(T);
  require(K >= 1 && Ns >= 1 && Nq >= 1, "steps, Ns and Nq must be >= 1");
  require(lr_mode >= 0 && lr_mode <= 3, "lr_mode must be in [0, 3]");
  require(n_msl >= 0 && n_msl <= K, "n_msl must be in [0, steps]");
  if (dtype == kFloat32)
    maml_impl<float>(s, T, K, Ns, Nq, W, b, xs, ys, xq, yq, lr_mode, lr, lr_value, msl, first_order, need_grad, n_lr,
                     n_msl, out_loss, out_dtheta, out_dlr, partials, as_stream(stream));
  else if (dtype == kFloat64)
    maml_impl<double>(s, T, K, Ns, Nq, W, b, xs, ys, xq, yq, lr_mode, lr, lr_value, msl, first_order, need_grad,
                      n_lr, n_msl, out_loss, out_dtheta, out_dlr, partials, as_stream(stream));
  else
    require(false, "dtype code must be 0 (float32) or 1 (float64)");
}

int64_t maml_mlp_cuda_smem_limit(int device) {
  int v = 0;
  FM_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // the group_sum scratch (kThreads doubles) comes out of the same budget
  return int64_t(v) - int64_t(kThreads) * 8;
}

}  // namespace fastmaml
